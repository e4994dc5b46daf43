"""Loading model folders: manifest checks, sha256, TorchScript load, probes, fast path, warm-up.

This is the only place the service calls `torch.jit.load`. Everything that runs a model at load
time (the probes at several batch sizes, the fast path's checks and timing, the warm-up passes)
is part of that model's checks: a folder that fails any of them is refused with one log line
naming it and why, and the others are served.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.artifact import MANIFEST_FORMAT, NAME_PATTERN, REQUIRED_FIELDS, sha256_of
from service.errors import ModelFailed, one_line
from service.fastpath import DEFAULT_REWRITES, optimize, row_buckets
from service.field import Signature, VelocityField
from service.mixture import GaussianMixture

log = logging.getLogger("flowserve.loader")

CPU = torch.device("cpu")

PROBE_ROWS = (5, 1)
"""Batch sizes every model is probed at first: a few rows (the messages quote this shape), one."""
LARGE_PROBE_VALUES = 4099 * 2
"""The last probe is large: 4,099 rows for a 2-D model (the fast path's timed size), fewer for
wide ones, never under 257 rows."""


class ModelRefused(Exception):
    """A model folder that cannot be served; the message says why."""


@dataclass(eq=False)
class LoadedModel:
    """A servable model: its manifest, source p0 and the `VelocityField` that calls it."""

    name: str
    dim: int
    source: GaussianMixture
    manifest: dict[str, Any]
    field: VelocityField
    device: torch.device
    optimizations: list[str] = field(default_factory=list)

    @property
    def signature(self) -> Signature:
        return self.field.signature

    @property
    def guidance_scale(self) -> float:
        """The default w of requests to this model (the manifest's, else 1)."""
        return float(self.manifest.get("guidance_scale", 1.0))


@dataclass(eq=False)
class ModelInfo:
    """What answering requests needs of a model without calling it: its manifest, source and
    signature. The HTTP fronts of a separate engine process hold these (`service.remote`);
    `LoadedModel` has the same attributes, and its field besides. Tensors a front builds stay on
    `device`, the CPU: they cross to the engine process as bytes."""

    name: str
    dim: int
    source: GaussianMixture
    manifest: dict[str, Any]
    signature: Signature
    device: torch.device = CPU

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ModelInfo:
        """From a manifest the engine process has already checked."""
        return cls(
            name=manifest["name"],
            dim=manifest["dim"],
            source=GaussianMixture.from_spec(manifest["source"]),
            manifest=manifest,
            signature=Signature.from_manifest(manifest),
        )

    @property
    def guidance_scale(self) -> float:
        return float(self.manifest.get("guidance_scale", 1.0))


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse and check `folder/manifest.json` against the contract; raise ModelRefused."""
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelRefused("no manifest.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelRefused(f"manifest.json unreadable: {exc}") from None
    if not isinstance(manifest, dict):
        raise ModelRefused("manifest.json: not a JSON object")
    missing = [key for key in REQUIRED_FIELDS if key not in manifest]
    if missing:
        raise ModelRefused(f"manifest.json: missing {', '.join(missing)}")
    if manifest["format"] != MANIFEST_FORMAT:
        raise ModelRefused(f"manifest.json: format {manifest['format']!r} is not {MANIFEST_FORMAT}")
    if manifest["name"] != folder.name:
        raise ModelRefused(f"manifest.json: name {manifest['name']!r} differs from the folder name")
    if not isinstance(manifest["name"], str) or not NAME_PATTERN.fullmatch(manifest["name"]):
        raise ModelRefused(f"manifest.json: name must match {NAME_PATTERN.pattern}")
    dim = manifest["dim"]
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ModelRefused(f"manifest.json: dim must be a positive integer, got {dim!r}")
    if not isinstance(manifest["sha256"], str):
        raise ModelRefused("manifest.json: sha256 must be a hex string")
    return manifest


def check_serving_fields(manifest: dict[str, Any]) -> Signature:
    """The optional fields of "Conditional and shaped models": the signature, `guidance_scale`
    and `data_range`; ValueError naming the field."""
    signature = Signature.from_manifest(manifest)
    scale = manifest.get("guidance_scale")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale >= 0:
            raise ValueError(f"guidance_scale: expected a number >= 0, got {scale!r}")
        if not math.isfinite(scale):
            raise ValueError(f"guidance_scale: expected a finite number, got {scale!r}")
        if scale != 1 and (signature.condition is None or not signature.condition.has_null):
            raise ValueError(
                f"guidance_scale: {scale} needs a condition with a null (guidance mixes in "
                "the unconditional field)"
            )
    data_range = manifest.get("data_range")
    if data_range is not None and not (
        isinstance(data_range, list)
        and len(data_range) == 2
        and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in data_range
        )
        and data_range[0] < data_range[1]
    ):
        raise ValueError(f"data_range: expected [lo, hi] with lo < hi, got {data_range!r}")
    return signature


def check_arguments(module: Any, signature: Signature) -> None:
    """ModelRefused when a TorchScript forward takes another number of arguments than `inputs`
    lists (other callables are not inspected)."""
    try:
        arguments = [a.name for a in module.forward.schema.arguments][1:]  # [0] is self
    except AttributeError:
        return
    if len(arguments) != len(signature.inputs):
        raise ModelRefused(
            f"forward({', '.join(arguments)}) takes {len(arguments)} arguments; the manifest's "
            f"inputs list {len(signature.inputs)} ({', '.join(signature.inputs)})"
        )


def probe(field: VelocityField, rows: int, seed: int = 0, *, finite: bool = False) -> None:
    """Run the field on a seeded input of `rows` rows; ModelRefused unless it answers a float32
    array of the input's shape (and, with `finite`, one without NaN or infinity: packaging asks
    for that; serving does not, as a field may be undefined off its data and the service refuses
    such answers per request)."""
    t, x, c = field.example(rows, seed)
    try:
        with torch.inference_mode():
            out = field(t, x, c)
    except ModelFailed as exc:  # the field's own output check names what came back
        raise ModelRefused(str(exc)) from None
    except Exception as exc:
        raise ModelRefused(
            f"{field.signature.call} failed on a probe input of {rows} rows: {one_line(exc)}"
        ) from None
    if finite and not torch.isfinite(out).all():
        raise ModelRefused(
            f"{field.signature.call} returned NaN or infinity on a probe input of {rows} rows"
        )


def probe_sizes(dim: int) -> tuple[int, ...]:
    return (*PROBE_ROWS, max(257, min(4099, LARGE_PROBE_VALUES // dim)))


def load_module(weights: Path, device: torch.device) -> torch.jit.ScriptModule:
    """`torch.jit.load` of a model file, in eval mode; ModelRefused when it does not load."""
    try:
        module = torch.jit.load(str(weights), map_location=device)
    except Exception as exc:  # torch raises several unrelated types for a corrupt archive
        raise ModelRefused(f"model.pt does not load as TorchScript: {one_line(exc)}") from None
    return module.eval()


def checked_field(
    module: torch.jit.ScriptModule,
    signature: Signature,
    device: torch.device,
    *,
    finite: bool = False,
) -> VelocityField:
    """The field of `module`, after its arguments and the probes at `probe_sizes` passed."""
    check_arguments(module, signature)
    field = VelocityField(signature, module, device=device)
    for rows in probe_sizes(signature.dim):
        probe(field, rows, finite=finite)
    return field


def warm_up(field: VelocityField, passes: int, rows: int) -> None:
    """Run a few forward passes so the first request does not pay for lazy initialisation."""
    t, x, c = field.example(rows, seed=2)
    with torch.no_grad():  # the engine's mode: plans are built for the tensors it passes
        for _ in range(passes):
            field(t, x, c)


def load_model(
    folder: Path,
    device: torch.device,
    *,
    rewrites: tuple[str, ...] = DEFAULT_REWRITES,
    fused_min_rows: int = 0,
    warmup_passes: int = 0,
    warmup_rows: int = 1024,
) -> LoadedModel:
    """Load and check one model folder; raise ModelRefused with the reason."""
    manifest = read_manifest(folder)
    dim = manifest["dim"]
    try:
        signature = check_serving_fields(manifest)
        source = GaussianMixture.from_spec(manifest["source"], field="source")
    except ValueError as exc:
        raise ModelRefused(f"manifest.json: {exc}") from None
    if source.dim != dim:
        raise ModelRefused(f"manifest.json: source has dimension {source.dim}, dim is {dim}")
    weights = folder / "model.pt"
    if not weights.is_file():
        raise ModelRefused("no model.pt")
    digest = sha256_of(weights)
    if digest != manifest["sha256"].lower():
        raise ModelRefused(
            f"sha256 mismatch: model.pt is {digest}, manifest says {manifest['sha256']}"
        )
    field = checked_field(load_module(weights, device), signature, device)
    try:
        fast = optimize(field, rewrites, row_buckets(fused_min_rows))
        field = field.with_graphs(
            fast.module, small=fast.unfused, small_rows=fused_min_rows, planned=fast.planned
        )
        warm_up(field, warmup_passes, warmup_rows)
    except Exception as exc:
        raise ModelRefused(f"the fast path or warm-up failed: {one_line(exc)}") from None
    return LoadedModel(
        name=manifest["name"],
        dim=dim,
        source=source,
        manifest=manifest,
        field=field,
        device=device,
        optimizations=fast.applied,
    )


def model_folders(models_dir: Path) -> list[Path]:
    """The folders under `models_dir` that are models to load, in name order (hidden ones are
    an atomic writer's work in progress)."""
    if not models_dir.is_dir():
        return []
    return sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_models_dir(models_dir: Path) -> None:
    """ValueError (one line) when `models_dir` is missing or holds no model folder."""
    if not models_dir.is_dir():
        raise ValueError(f"models dir {models_dir} does not exist (FLOW_MODELS_DIR, --models-dir)")
    if not model_folders(models_dir):
        raise ValueError(
            f"models dir {models_dir} holds no model folder (FLOW_MODELS_DIR, --models-dir)"
        )


def load_models(
    models_dir: Path,
    device: torch.device,
    refused: dict[str, str] | None = None,
    **options: Any,
) -> dict[str, LoadedModel]:
    """Every servable folder under `models_dir`, by name; refusals are logged, not raised, and
    recorded in `refused` (folder name -> reason). `options` are `load_model`'s."""
    models: dict[str, LoadedModel] = {}
    if not models_dir.is_dir():
        log.error("models dir %s does not exist: no model will be served", models_dir)
        return models
    for folder in model_folders(models_dir):
        try:
            model = load_model(folder, device, **options)
        except ModelRefused as exc:
            log.error("refused model %s: %s", folder.name, exc)
            if refused is not None:
                refused[folder.name] = str(exc)
            continue
        models[model.name] = model
        log.info(
            "loaded model %s (dim %d) on %s; graph rewrites: %s",
            model.name,
            model.dim,
            device,
            ", ".join(model.optimizations) or "none",
        )
    return models
