"""The training config: JSON on disk, frozen dataclasses in memory.

```json
{
  "source": MIXTURE | {"std": 1.0},
  "target": MIXTURE | {"dataset": NAME, "noise"?: float, "size"?: int} | {"file": PATH}
            | {"dataset": "digits", "holdout"?: 0.2} | {"file": "data.npz", "holdout"?: 0.2},
  "model":  {"hidden": 64, "layers": 3, "activation"?: "elu", "embedding"?: 64, "frequencies"?: 16},
  "train":  {"batch_size": 1024, "steps": 5000, "lr": 0.001, "seed": 0, ...optional keys},
  "condition"?: {"kind": "class", "p_uncond": 0.1},
  "guidance_scale"?: 1.5,
  "notes"?: "free text: why the settings are what they are"
}
```

The optional `train` keys and their defaults are the fields of `TrainConfig`. A relative `file`
path is read relative to the config file's folder. `{"std": s}` is the source N(0, s^2 I) in the
target's dimension. A labelled target (digits, or an .npz of images `x` and labels `y`) trains a
class-conditional model and needs `condition`; `p_uncond` is the share of each batch whose label
is replaced by the null class (label dropout), so one network gives v(t, x, c) and v(t, x, null)
for classifier-free guidance; `guidance_scale` is the served model's default w. Every problem
raises `ValueError` with one line that starts with the field (`target.covs[2]: not positive
definite`) or the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.mixture import GaussianMixture
from service.tableau import SOLVER_NAMES
from training.datasets import (
    DATASETS,
    LABELLED_DATASETS,
    DatasetTarget,
    LabelledTarget,
    MixtureTarget,
    PointCloudTarget,
    Target,
    load_digits_target,
    load_labelled_file,
    load_points,
)
from training.network import ACTIVATIONS

COUPLINGS = ("independent", "ot", "reflow")
SCHEDULES = ("constant", "cosine")
TIME_SAMPLINGS = ("uniform", "ends")


@dataclass(frozen=True)
class ModelConfig:
    """hidden x layers MLP. For a conditional model: `embedding` is the width of the learned
    label embedding, `frequencies` the number of sine/cosine pairs that encode t."""

    hidden: int
    layers: int
    activation: str = "elu"
    embedding: int = 64
    frequencies: int = 16


@dataclass(frozen=True)
class TeacherConfig:
    """Reflow: the trained model whose ODE solution gives each x0 its x1.

    path: the teacher's model folder (relative paths from the config's folder); solver and
    steps: how its ODE is solved for the pairs; pairs: how many pairs are drawn before training
    (batches are drawn from them); distill: the weight of the distillation terms, which ask the
    student's own 1- and 2-step Euler maps to land on the teacher's x1 (0: plain reflow)."""

    path: str
    solver: str = "rk4"
    steps: int = 25
    pairs: int = 200_000
    distill: float = 0.0
    base_dir: str = dataclasses.field(default=".", compare=False, repr=False)

    @property
    def location(self) -> Path:
        """The teacher's folder: `path`, from the config's folder when relative."""
        path = Path(self.path)
        return path if path.is_absolute() else Path(self.base_dir) / path

    def spec(self) -> dict[str, Any]:
        """As the config wrote it (what the manifest records)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "base_dir"}


@dataclass(frozen=True)
class ConditionConfig:
    """kind "class": labels from a labelled target; p_uncond: share of labels dropped to null."""

    kind: str
    p_uncond: float


TRAIN_DEFAULTS = {"batch_size": 1024, "steps": 5000, "lr": 0.002, "seed": 0}
"""Defaults of the four basic `train` keys (any may be left out, or given as a flag)."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Every key has a default: the four basic ones `TRAIN_DEFAULTS`, the
    others below. The defaults are the recipe that scores best on the bundled demo: warm-up,
    cosine decay and an exponential moving average of the weights (the reference post's plain
    recipe is schedule "constant", warmup 0, ema 0).

    coupling: "independent" pairs x0 and x1 at random (the reference algorithm); "ot" re-pairs
        each minibatch by the exact optimal assignment under squared Euclidean cost.
    schedule: "constant" lr, or "cosine" decay from lr to `lr * min_lr_ratio` after a linear
        warm-up of `warmup` steps.
    ema: decay of an exponential moving average of the weights; the average is what gets
        exported. 0 exports the raw weights.
    time_sampling: "uniform" t ~ U[0, 1], or "ends": a share `ends_weight` of each batch drawn
        from the arcsine law (density 1 / (pi sqrt(t (1 - t)))), which visits both ends more.
    """

    batch_size: int
    steps: int
    lr: float
    seed: int
    coupling: str = "independent"
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup: int | None = None
    """None: 200 steps, or a tenth of the steps when that is less."""
    min_lr_ratio: float = 0.0
    ema: float = 0.999
    time_sampling: str = "uniform"
    ends_weight: float = 0.5


@dataclass(frozen=True)
class Config:
    source: GaussianMixture
    target: Target
    model: ModelConfig
    train: TrainConfig
    notes: str = ""
    condition: ConditionConfig | None = None
    guidance_scale: float | None = None
    teacher: TeacherConfig | None = None
    source_std: float | None = None
    """Set when the config gave the source as {"std": s}; it is recorded in that short form."""

    @property
    def dim(self) -> int:
        return self.source.dim

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, as JSON-ready data (this is what the manifest records)."""
        resolved: dict[str, Any] = {
            "source": (
                {"std": self.source_std} if self.source_std is not None else self.source.to_spec()
            ),
            "target": self.target.spec(),
            "model": dataclasses.asdict(self.model),
            "train": dataclasses.asdict(self.train),
        }
        if self.condition is not None:
            resolved["condition"] = dataclasses.asdict(self.condition)
        if self.guidance_scale is not None:
            resolved["guidance_scale"] = self.guidance_scale
        if self.teacher is not None:
            resolved["teacher"] = self.teacher.spec()
        if self.notes:
            resolved["notes"] = self.notes
        return resolved


def _check_keys(obj: Any, field: str, required: set[str], optional: set[str]) -> None:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{field}: expected an object")
    missing = sorted(required - set(obj))
    if missing:
        raise ValueError(f"{field}: missing {', '.join(missing)}")
    unknown = sorted(set(obj) - required - optional)
    if unknown:
        raise ValueError(f"{field}: unknown field(s) {', '.join(unknown)}")


def _integer(value: Any, field: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{field}: must be at least {minimum}, got {value}")
    return value


def _number(value: Any, field: str, low: float, high: float, *, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{field}: expected a finite number, got {value!r}")
    if value < low or (open_low and value == low) or value > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"{field}: must be in {bracket}{low}, {high}], got {value}")
    return float(value)


def _choice(value: Any, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{field}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _holdout(spec: Mapping) -> float:
    if "holdout" not in spec:
        return 0.2
    return _number(spec["holdout"], "target.holdout", 0.0, 0.9, open_low=True)


def _parse_target(spec: Any, base_dir: Path, seed: int) -> Target:
    if isinstance(spec, Mapping) and spec.get("dataset") in LABELLED_DATASETS:
        _check_keys(spec, "target", {"dataset"}, {"holdout"})
        return load_digits_target(_holdout(spec))
    if (
        isinstance(spec, Mapping)
        and isinstance(spec.get("file"), str)
        and spec["file"].lower().endswith(".npz")
    ):
        _check_keys(spec, "target", {"file"}, {"holdout"})
        path = Path(spec["file"])
        if not path.is_absolute():
            path = base_dir / path
        return load_labelled_file(path, spec["file"], _holdout(spec))
    if isinstance(spec, Mapping) and "dataset" in spec:
        _check_keys(spec, "target", {"dataset"}, {"noise", "size"})
        name = _choice(spec["dataset"], "target.dataset", (*DATASETS, *LABELLED_DATASETS))
        noise = spec.get("noise")
        if noise is not None:
            noise = _number(noise, "target.noise", 0.0, math.inf)
        size = spec.get("size")
        if size is not None:
            size = _integer(size, "target.size", minimum=1)
        return DatasetTarget(name, noise=noise, size=size, seed=seed)
    if isinstance(spec, Mapping) and "file" in spec:
        _check_keys(spec, "target", {"file"}, set())
        if not isinstance(spec["file"], str) or not spec["file"]:
            raise ValueError("target.file: expected a path")
        path = Path(spec["file"])
        if not path.is_absolute():
            path = base_dir / path
        return PointCloudTarget(load_points(path), spec["file"])
    return MixtureTarget(GaussianMixture.from_spec(spec, field="target"))


def parse_config(raw: Any, base_dir: Path | str = ".", overrides: Mapping[str, Any] | None = None):
    """Validate a decoded JSON config; `overrides` replace keys of `train` (the CLI flags)."""
    _check_keys(
        raw,
        "config",
        {"source", "target", "model"},
        {"train", "notes", "condition", "guidance_scale", "teacher"},
    )
    if "notes" in raw and not isinstance(raw["notes"], str):
        raise ValueError("notes: expected a string")

    model_raw = raw["model"]
    _check_keys(
        model_raw, "model", {"hidden", "layers"}, {"activation", "embedding", "frequencies"}
    )
    model = ModelConfig(
        hidden=_integer(model_raw["hidden"], "model.hidden", minimum=1),
        layers=_integer(model_raw["layers"], "model.layers", minimum=1),
        activation=_choice(
            model_raw.get("activation", "elu"), "model.activation", tuple(ACTIVATIONS)
        ),
        embedding=_integer(model_raw.get("embedding", 64), "model.embedding", minimum=1),
        frequencies=_integer(model_raw.get("frequencies", 16), "model.frequencies", minimum=1),
    )

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train_raw = raw.get("train", {})
    _check_keys(train_raw, "train", set(), train_fields)
    train_raw = {
        **TRAIN_DEFAULTS,
        **train_raw,
        **{k: v for k, v in (overrides or {}).items() if v is not None},
    }
    t = TrainConfig(**train_raw)
    warmup = t.warmup
    if warmup is None and isinstance(t.steps, int):
        warmup = min(200, t.steps // 10)
    train = TrainConfig(
        batch_size=_integer(t.batch_size, "train.batch_size", minimum=1),
        steps=_integer(t.steps, "train.steps", minimum=1),
        lr=_number(t.lr, "train.lr", 0.0, math.inf, open_low=True),
        seed=_integer(t.seed, "train.seed", minimum=0),
        coupling=_choice(t.coupling, "train.coupling", COUPLINGS),
        weight_decay=_number(t.weight_decay, "train.weight_decay", 0.0, math.inf),
        schedule=_choice(t.schedule, "train.schedule", SCHEDULES),
        warmup=_integer(warmup, "train.warmup", minimum=0),
        min_lr_ratio=_number(t.min_lr_ratio, "train.min_lr_ratio", 0.0, 1.0),
        ema=_number(t.ema, "train.ema", 0.0, 1.0),
        time_sampling=_choice(t.time_sampling, "train.time_sampling", TIME_SAMPLINGS),
        ends_weight=_number(t.ends_weight, "train.ends_weight", 0.0, 1.0),
    )
    if train.ema == 1.0:
        raise ValueError("train.ema: must be below 1 (1 would never move the average)")

    target = _parse_target(raw["target"], Path(base_dir), train.seed)
    source = _parse_source(raw["source"], target.dim)
    if target.dim != source.dim:
        raise ValueError(
            f"target: dimension {target.dim} does not match the source's dimension {source.dim}"
        )
    condition = _parse_condition(raw.get("condition"), target)
    if condition is not None and train.coupling != "independent":
        raise ValueError(
            f"train.coupling: {train.coupling} re-pairs points without their labels; a "
            "conditional model trains with independent pairs"
        )
    guidance_scale = None
    if raw.get("guidance_scale") is not None:
        guidance_scale = _number(raw["guidance_scale"], "guidance_scale", 0.0, math.inf)
        if guidance_scale != 1 and (condition is None or condition.p_uncond == 0):
            raise ValueError(
                "guidance_scale: needs a condition trained with p_uncond > 0 (guidance mixes in "
                "the unconditional field)"
            )
    teacher = _parse_teacher(raw.get("teacher"), train.coupling, Path(base_dir))
    notes = raw.get("notes", "")
    return Config(
        source=source,
        target=target,
        model=model,
        train=train,
        notes=notes,
        condition=condition,
        guidance_scale=guidance_scale,
        teacher=teacher,
        source_std=raw["source"].get("std") if isinstance(raw["source"], Mapping) else None,
    )


def _parse_teacher(spec: Any, coupling: str, base_dir: Path) -> TeacherConfig | None:
    if coupling != "reflow":
        if spec is not None:
            raise ValueError('teacher: only with "coupling": "reflow"')
        return None
    if spec is None:
        raise ValueError('teacher: "coupling": "reflow" needs a teacher, {"path": MODEL_DIR}')
    _check_keys(spec, "teacher", {"path"}, {"solver", "steps", "pairs", "distill"})
    if not isinstance(spec["path"], str) or not spec["path"]:
        raise ValueError("teacher.path: expected the path of a model folder")
    return TeacherConfig(
        path=spec["path"],
        base_dir=str(base_dir),
        solver=_choice(spec.get("solver", "rk4"), "teacher.solver", SOLVER_NAMES),
        steps=_integer(spec.get("steps", 25), "teacher.steps", minimum=1),
        pairs=_integer(spec.get("pairs", 200_000), "teacher.pairs", minimum=1),
        distill=_number(spec.get("distill", 0.0), "teacher.distill", 0.0, math.inf),
    )


def _parse_source(spec: Any, dim: int) -> GaussianMixture:
    if isinstance(spec, Mapping) and "std" in spec:
        _check_keys(spec, "source", {"std"}, set())
        std = _number(spec["std"], "source.std", 0.0, math.inf, open_low=True)
        eye = [[std**2 if i == j else 0.0 for j in range(dim)] for i in range(dim)]
        return GaussianMixture.from_spec(
            {"means": [[0.0] * dim], "covs": [eye], "weights": [1.0]}, field="source"
        )
    return GaussianMixture.from_spec(spec, field="source")


def _parse_condition(spec: Any, target: Target) -> ConditionConfig | None:
    labelled = isinstance(target, LabelledTarget)
    if spec is None:
        if labelled:
            raise ValueError(
                "condition: a labelled target trains a class-conditional model; add "
                '"condition": {"kind": "class", "p_uncond": 0.1}'
            )
        return None
    _check_keys(spec, "condition", {"kind"}, {"p_uncond"})
    kind = _choice(spec["kind"], "condition.kind", ("class",))
    if not labelled:
        raise ValueError(
            "condition: needs a labelled target (digits, or an .npz file with x and y)"
        )
    p_uncond = _number(spec.get("p_uncond", 0.1), "condition.p_uncond", 0.0, 0.9)
    return ConditionConfig(kind=kind, p_uncond=p_uncond)


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate a config file; errors name the file when it is not valid JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"{path}: cannot read ({reason})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return parse_config(raw, base_dir=path.parent, overrides=overrides)
