"""What each operation does between validation and encoding: check the request against the model
and the limits, build the engine job off the event loop, await it, shape the answer.

Nothing here knows HTTP: operations take the validated request, the settings and an optional
`disconnected` awaitable (it returns when the caller has gone away, which cancels the job), raise
`service.errors` domain errors, and return an `Answer` whose `meta` the edge turns into headers.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.encoding import is_image_shape
from service.engine import Divergence, Draw, EngineClient, Job, JobResult
from service.errors import DeadlineExceeded, InvalidInput, LimitExceeded, ModelFailed
from service.registry import Served
from service.schemas import (
    EncodeRequest,
    LogProbRequest,
    SampleRequest,
    TrajectoryRequest,
    VelocityRequest,
)
from service.settings import Settings
from service.solvers import get_solver, kept_steps

Disconnected = Callable[[], Awaitable[None]]
"""Returns once the caller has gone away (a closed connection); the job is then cancelled."""


@dataclass
class Answer:
    """body: the JSON answer (numpy arrays allowed); array: what a .npy answer carries; meta: the
    answer's scalar fields (model, seed, num_steps, solver, nfe, ...) that travel beside an array,
    None where they do not apply."""

    body: dict[str, Any]
    array: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    images: np.ndarray | None = None
    """Samples that are pictures, (n, *shape) for an image shape; None for any other answer."""
    data_range: tuple[float, float] | None = None

    @property
    def nbytes(self) -> int:
        """Size of the arrays in the answer (what encoding has to copy)."""
        return sum(v.nbytes for v in self.body.values() if isinstance(v, np.ndarray))


def _check_common(
    rows: int,
    num_steps: int,
    solver: str,
    settings: Settings,
    field_name: str,
    evaluations: int = 1,
) -> int:
    """Limits every request shares; returns the network evaluations per row (nfe), two per
    stage for a guided request (`evaluations` 2)."""
    if rows > settings.max_samples:
        raise LimitExceeded(field_name, rows, settings.max_samples, "FLOW_MAX_SAMPLES")
    if num_steps > settings.max_steps:
        raise LimitExceeded("num_steps", num_steps, settings.max_steps, "FLOW_MAX_STEPS")
    nfe = num_steps * get_solver(solver).stages * evaluations
    if rows * nfe > settings.max_row_steps:
        raise LimitExceeded(
            f"{field_name} x nfe", rows * nfe, settings.max_row_steps, "FLOW_MAX_ROW_STEPS"
        )
    return nfe


def _check_width(points: Any, served: Served, field_name: str) -> None:
    """422 for points of the wrong dimension: decided from the first row, before the request
    is admitted (whatever the engine's state, bad input is a 422)."""
    width = len(points[0])
    if width != served.model.dim:
        raise InvalidInput(
            f"{field_name}: points have {width} coordinates; model {served.model.name} has "
            f"dim {served.model.dim}",
        )


def _points(points: Any, served: Served, field_name: str, limit: float) -> torch.Tensor:
    """(n, dim) float32 tensor on the model's device (the width checked by `_check_width`); 422
    for coordinates past `limit`, where any network overflows float32 and answers would be
    NaN."""
    with np.errstate(over="ignore"):
        array = np.asarray(points, dtype=np.float32)
    largest = float(np.abs(array).max())
    if not largest <= limit:
        raise InvalidInput(
            f"{field_name}: coordinates must lie within +-{limit:g} (FLOW_MAX_ABS_INPUT); "
            f"got {largest:.3g}",
        )
    return torch.from_numpy(array).to(served.model.device)


@dataclass
class Conditioning:
    """A request's condition resolved against its model.

    columns: builds the (rows, width) float32 condition columns on the model's device and the
    answer's echo of them (label indices, or the vectors), or None for an unconditional model;
    per_row: whether building them walks a list of one entry per row (done off the event loop).
    guidance: w, or None for w = 1 (one evaluation a stage). echo: the answer's fields.
    """

    columns: Callable[[], tuple[torch.Tensor, Any]] | None = None
    per_row: bool = False
    guidance: float | None = None
    echo: dict[str, Any] = field(default_factory=dict)
    same_label: int | None = None

    @property
    def evaluations(self) -> int:
        return 1 if self.guidance is None else 2

    def build(self) -> torch.Tensor | None:
        """The condition columns; records their echo ("labels" or "condition")."""
        if self.columns is None:
            return None
        columns, echoed = self.columns()
        self.echo["labels" if self.echo.get("kind") == "class" else "condition"] = echoed
        return columns

    def answer_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.echo.items() if k != "kind"}


def _conditioning(served: Served, req: Any, rows: int, settings: Settings) -> Conditioning:
    """Check `labels`, `condition` and `guidance_scale` of `req` against the model."""
    model = served.model
    name = model.name
    condition = model.signature.condition
    w = req.guidance_scale if req.guidance_scale is not None else model.guidance_scale
    if condition is None:
        for given in ("labels", "condition"):
            if getattr(req, given) is not None:
                raise InvalidInput(f"{given}: model {name} is unconditional; it takes no {given}")
        if w != 1:
            raise InvalidInput(
                f"guidance_scale: model {name} is unconditional; only 1 applies, got {w:g}"
            )
        return Conditioning()
    if w != 1 and condition.null is None:
        raise InvalidInput(
            f"guidance_scale: model {name} has no null condition, so only 1 applies, got {w:g}"
        )
    guidance = None if w == 1 else float(w)
    device = model.device
    echo: dict[str, Any] = {"kind": condition.kind, "guidance_scale": float(w)}
    if condition.kind == "class":
        if req.condition is not None:
            raise InvalidInput(
                f"condition: model {name} takes class labels (labels), not a vector condition"
            )
        labels = req.labels
        if labels is None:
            if condition.null is None:
                raise InvalidInput(
                    f"labels: model {name} needs labels (a class index or name for every row, "
                    "or one per row); it has no null class"
                )
            labels = int(condition.null[0])
        if not isinstance(labels, list):
            index = (
                labels
                if req.labels is None
                else _class_index(labels, "labels", condition.classes, name)
            )
            return Conditioning(
                lambda: _repeat([float(index)], rows, device, [index] * rows),
                guidance=guidance,
                echo=echo,
                same_label=index,
            )
        if len(labels) != rows:
            raise InvalidInput(
                f"labels: {len(labels)} labels for {rows} rows; give one label for every row, "
                "or one per row"
            )

        def per_row_labels() -> tuple[torch.Tensor, Any]:
            indices = _class_indices(labels, condition.classes, name)
            columns = torch.from_numpy(indices.astype(np.float32)).unsqueeze(1).to(device)
            return columns, indices

        return Conditioning(per_row_labels, True, guidance, echo)
    if req.labels is not None:
        raise InvalidInput(
            f"labels: model {name} takes a vector condition (condition), not class labels"
        )
    vectors = req.condition
    width = condition.width
    if vectors is None:
        if condition.null is None:
            raise InvalidInput(
                f"condition: model {name} needs a condition (one vector of width {width} for "
                "every row, or one per row); it has no null vector"
            )
        vectors = list(condition.null)
    if not isinstance(vectors[0], list):
        if len(vectors) != width:
            raise InvalidInput(
                f"condition: a vector of width {len(vectors)}; model {name} takes width {width}"
            )
        _check_magnitude(vectors, "condition", settings.max_abs_input)
        return Conditioning(lambda: _repeat(vectors, rows, device, vectors), False, guidance, echo)
    if len(vectors) != rows:
        raise InvalidInput(
            f"condition: {len(vectors)} vectors for {rows} rows; give one vector for every row, "
            "or one per row"
        )
    if len(vectors[0]) != width:
        raise InvalidInput(
            f"condition: vectors of width {len(vectors[0])}; model {name} takes width {width}"
        )

    def per_row_vectors() -> tuple[torch.Tensor, Any]:
        array = np.asarray(vectors, dtype=np.float32)
        _check_magnitude(array, "condition", settings.max_abs_input)
        return torch.from_numpy(array).to(device), vectors

    return Conditioning(per_row_vectors, True, guidance, echo)


def _repeat(
    vector: list[float], rows: int, device: torch.device, echoed: Any
) -> tuple[torch.Tensor, Any]:
    """One condition for every row: a (1, width) tensor expanded to (rows, width), no copy."""
    return torch.tensor([vector], device=device).expand(rows, -1), echoed


def _class_index(label: int | str, where: str, classes: tuple[str, ...], name: str) -> int:
    if isinstance(label, str):
        try:
            return classes.index(label)
        except ValueError:
            shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
            raise InvalidInput(
                f"{where}: unknown class {label!r}; model {name} has {shown}"
            ) from None
    if label >= len(classes):
        raise InvalidInput(
            f"{where}: class {label} is out of range; model {name} has {len(classes)} classes "
            f"(0 to {len(classes) - 1})"
        )
    return label


def _class_indices(labels: list[int | str], classes: tuple[str, ...], name: str) -> np.ndarray:
    """(rows,) int64 indices of per-row labels; InvalidInput naming the first bad one."""
    if all(type(label) is int for label in labels):
        indices = np.asarray(labels, dtype=np.int64)
        bad = np.flatnonzero(indices >= len(classes))
        if bad.size:
            _class_index(int(indices[bad[0]]), f"labels[{bad[0]}]", classes, name)
        return indices
    return np.asarray(
        [_class_index(label, f"labels[{i}]", classes, name) for i, label in enumerate(labels)],
        dtype=np.int64,
    )


def _check_magnitude(values: Any, field_name: str, limit: float) -> None:
    with np.errstate(over="ignore"):
        largest = float(np.abs(np.asarray(values, dtype=np.float32)).max())
    if not largest <= limit:
        raise InvalidInput(
            f"{field_name}: values must lie within +-{limit:g} (FLOW_MAX_ABS_INPUT); "
            f"got {largest:.3g}"
        )


def _shaped(served: Served, array: np.ndarray) -> np.ndarray:
    """Rows (..., n, dim) as samples of the model's shape, (..., n, *shape): a view."""
    shape = served.model.signature.shape
    if len(shape) == 1:
        return array
    return array.reshape(*array.shape[:-1], *shape)


def _shape_field(served: Served) -> dict[str, Any]:
    shape = served.model.signature.shape
    return {} if len(shape) == 1 else {"shape": list(shape)}


def _timeout(requested: float | None, settings: Settings) -> float:
    return min(requested or settings.request_timeout_s, settings.request_timeout_s)


async def _cancel_when(disconnected: Disconnected, job: Job) -> None:
    await disconnected()
    job.cancel("disconnect")


async def execute(
    served: Served,
    rows: int,
    build: Job | Callable[[], Job],
    timeout_s: float,
    disconnected: Disconnected | None = None,
) -> JobResult:
    """Admit `rows`, run the job (built in a worker thread when `build` is a function, for
    client-sent points); a caller that goes away cancels the job. Raises the engine's errors."""
    engine: EngineClient = served.engine  # a thread here, or the engine process
    release = engine.reserve(rows)
    try:
        job = build if isinstance(build, Job) else await asyncio.to_thread(build)
        job.deadline = time.monotonic() + timeout_s
        watcher = None
        if disconnected is not None:
            watcher = asyncio.ensure_future(_cancel_when(disconnected, job))
        try:
            return await engine.run(job)
        finally:
            if watcher is not None:
                watcher.cancel()
    except DeadlineExceeded:
        raise DeadlineExceeded(
            f"timeout_s: no answer within {timeout_s:g} s; the work was stopped"
        ) from None
    finally:
        release()


def _check_finite(served: Served, result: JobResult) -> None:
    if not result.finite:
        served.metrics.nonfinite.labels(served.model.name).inc()
        raise ModelFailed(
            f"model {served.model.name} produced non-finite values (NaN or infinity) for this "
            "request; no data was returned",
        )


async def sample(
    served: Served,
    req: SampleRequest | TrajectoryRequest,
    settings: Settings,
    disconnected: Disconnected | None = None,
) -> Answer:
    """POST /sample and, with a TrajectoryRequest, POST /trajectory."""
    field_name = "x0" if req.x0 is not None else "num_samples"
    rows = req.rows
    conditioning = _conditioning(served, req, rows, settings)
    nfe = _check_common(
        rows, req.num_steps, req.solver, settings, field_name, conditioning.evaluations
    )
    if req.x0 is not None:
        _check_width(req.x0, served, "x0")
    stride = getattr(req, "stride", None)
    dim = served.model.dim
    keep = kept_steps(req.num_steps, stride) if stride is not None else None
    if keep is not None and len(keep) * rows * dim > settings.max_trajectory_values:
        raise LimitExceeded(
            "trajectory size (kept states x num_samples x dim)",
            len(keep) * rows * dim,
            settings.max_trajectory_values,
            "FLOW_MAX_TRAJECTORY_VALUES",
        )
    seed = (
        None
        if req.x0 is not None
        else (req.seed if req.seed is not None else secrets.randbelow(2**63))
    )

    def build() -> Job:
        if req.x0 is not None:
            start: Any = _points(req.x0, served, "x0", settings.max_abs_input)
        else:
            start = Draw(seed, rows)
        return Job(
            z0=start,
            rows=rows,
            width=dim,
            solver=req.solver,
            num_steps=req.num_steps,
            keep=keep,
            condition=conditioning.build(),
            guidance=conditioning.guidance,
        )

    # Client-sent points and per-row conditions are read in a worker thread; otherwise the job
    # is built here and its start points drawn on the engine's thread.
    work = build if req.x0 is not None or conditioning.per_row else build()
    result = await execute(served, rows, work, _timeout(req.timeout_s, settings), disconnected)
    states = result.trajectory if keep is not None else result.final
    _check_finite(served, result)
    served.metrics.samples.labels(served.model.name).inc(rows)
    body: dict[str, Any] = {
        "model": served.model.name,
        "num_samples": rows,
        "num_steps": req.num_steps,
        "dim": dim,
        "solver": req.solver,
        "nfe": nfe,
        "seed": seed,
        **_shape_field(served),
        **conditioning.answer_fields(),
    }
    array = _shaped(served, states.numpy())
    if keep is None:
        body["samples"] = array
    else:
        body["stride"] = stride
        body["times"] = [k / req.num_steps for k in keep]
        body["trajectory"] = array
    meta = {
        "model": served.model.name,
        "seed": seed,
        "num_steps": req.num_steps,
        "stride": stride,
        "solver": req.solver,
        "nfe": nfe,
        **_scalar_echo(conditioning),
    }
    answer = Answer(body, array, meta)
    if keep is None and is_image_shape(served.model.signature.shape):
        answer.images = array
        data_range = served.model.manifest.get("data_range")
        answer.data_range = tuple(data_range) if data_range is not None else None
    return answer


def _scalar_echo(conditioning: Conditioning) -> dict[str, Any]:
    """What of the condition travels as headers beside an array: the guidance scale, and the
    label when every row was asked for the same one."""
    return {
        "guidance_scale": conditioning.echo.get("guidance_scale"),
        "labels": conditioning.same_label,
    }


async def encode(
    served: Served, req: EncodeRequest, settings: Settings, disconnected: Disconnected | None = None
) -> Answer:
    """POST /encode: integrate x from t = 1 back to t = 0."""
    conditioning = _conditioning(served, req, req.rows, settings)
    nfe = _check_common(
        req.rows, req.num_steps, req.solver, settings, "x", conditioning.evaluations
    )
    _check_width(req.x, served, "x")

    def build() -> Job:
        x = _points(req.x, served, "x", settings.max_abs_input)
        return Job(
            z0=x,
            solver=req.solver,
            num_steps=req.num_steps,
            t0=1.0,
            t1=0.0,
            condition=conditioning.build(),
            guidance=conditioning.guidance,
        )

    timeout = _timeout(req.timeout_s, settings)
    result = await execute(served, req.rows, build, timeout, disconnected)
    _check_finite(served, result)
    served.metrics.samples.labels(served.model.name).inc(req.rows)
    latents = _shaped(served, result.final.numpy())
    body = {
        "model": served.model.name,
        "num_samples": req.rows,
        "num_steps": req.num_steps,
        "dim": served.model.dim,
        "solver": req.solver,
        "nfe": nfe,
        **_shape_field(served),
        **conditioning.answer_fields(),
        "latents": latents,
    }
    meta = {
        "model": served.model.name,
        "num_steps": req.num_steps,
        "solver": req.solver,
        "nfe": nfe,
        **_scalar_echo(conditioning),
    }
    return Answer(body, latents, meta)


async def velocity(
    served: Served,
    req: VelocityRequest,
    settings: Settings,
    disconnected: Disconnected | None = None,
) -> Answer:
    """POST /velocity: the field v(t, x) at the given points (v_w with guidance), in one pass
    that shares the engine with every other request."""
    conditioning = _conditioning(served, req, req.rows, settings)
    nfe = _check_common(req.rows, 1, "euler", settings, "x", conditioning.evaluations)
    _check_width(req.x, served, "x")

    def build() -> Job:
        x = _points(req.x, served, "x", settings.max_abs_input)
        return Job(
            z0=torch.cat([x, torch.zeros_like(x)], dim=1),
            solver="euler",
            num_steps=1,
            t0=req.t,
            t1=req.t + 1.0,  # one step of length 1 from t: the zeros become v(t, x)
            condition=conditioning.build(),
            guidance=conditioning.guidance,
            velocity=True,
        )

    timeout = _timeout(req.timeout_s, settings)
    result = await execute(served, req.rows, build, timeout, disconnected)
    _check_finite(served, result)
    v = _shaped(served, result.final[:, served.model.dim :].numpy())
    body = {
        "model": served.model.name,
        "num_samples": req.rows,
        "dim": served.model.dim,
        "t": req.t,
        "nfe": nfe,
        **_shape_field(served),
        **conditioning.answer_fields(),
        "velocity": v,
    }
    meta = {"model": served.model.name, "t": req.t, "nfe": nfe, **_scalar_echo(conditioning)}
    return Answer(body, v, meta)


async def log_prob(
    served: Served,
    req: LogProbRequest,
    settings: Settings,
    disconnected: Disconnected | None = None,
) -> Answer:
    """POST /log_prob: the augmented ODE (x, integral of div v) from t = 1 back to t = 0.

    log p1(x) = log p0(x0) - integral_0^1 div v(t, x_t) dt, x0 the latent of x.
    """
    dim = served.model.dim
    conditioning = _conditioning(served, req, req.rows, settings)
    nfe = _check_common(
        req.rows, req.num_steps, req.solver, settings, "x", conditioning.evaluations
    )
    _check_width(req.x, served, "x")
    method = req.divergence or (
        "exact" if dim <= settings.max_exact_divergence_dim else "hutchinson"
    )
    if req.num_probes is not None and method == "exact":
        # Dropping the probes silently would answer a different question than the one asked.
        raise InvalidInput(
            f"num_probes: only applies to divergence 'hutchinson'; model {served.model.name} "
            f"(dim {dim}) defaults to 'exact' (up to dim {settings.max_exact_divergence_dim}, "
            "FLOW_MAX_EXACT_DIVERGENCE_DIM)",
        )
    probes = (req.num_probes or 1) if method == "hutchinson" else None
    if probes is not None and probes > settings.max_probes:
        raise LimitExceeded("num_probes", probes, settings.max_probes, "FLOW_MAX_PROBES")
    if probes is not None and req.rows * probes * dim > settings.max_probe_values:
        # The probes stay in memory for the whole integration, whatever the step count.
        raise LimitExceeded(
            "x rows x num_probes x dim",
            req.rows * probes * dim,
            settings.max_probe_values,
            "FLOW_MAX_PROBE_VALUES",
        )
    passes = dim if method == "exact" else probes
    work = req.rows * nfe * passes
    if work > settings.max_divergence_row_steps:
        raise LimitExceeded(
            "x rows x nfe x divergence passes",
            work,
            settings.max_divergence_row_steps,
            "FLOW_MAX_DIVERGENCE_ROW_STEPS",
        )
    seed = None
    if method == "hutchinson":
        seed = req.seed if req.seed is not None else secrets.randbelow(2**63)
    columns = 1 if method == "exact" else probes
    device = served.model.device

    def build() -> Job:
        x = _points(req.x, served, "x", settings.max_abs_input)
        z0 = torch.cat([x, torch.zeros(req.rows, columns, device=device)], dim=1)
        eps = None
        if method == "hutchinson":
            # Drawn on the CPU whatever the device, so a seed means the same probes everywhere.
            generator = torch.Generator().manual_seed(seed)
            bits = torch.randint(0, 2, (req.rows, probes, dim), generator=generator)
            eps = (bits.to(torch.float32) * 2 - 1).to(device)
        return Job(
            z0=z0,
            solver=req.solver,
            num_steps=req.num_steps,
            t0=1.0,
            t1=0.0,
            divergence=Divergence(method, columns),
            probes=eps,
            condition=conditioning.build(),
            guidance=conditioning.guidance,
        )

    timeout = _timeout(req.timeout_s, settings)
    result = await execute(served, req.rows, build, timeout, disconnected)
    _check_finite(served, result)

    def densities() -> dict[str, Any]:
        latents = result.final[:, :dim]
        # Integrating d(I)/dt = div v backward from I(1) = 0 leaves I(0) = -integral_0^1 div v.
        per_probe = -result.final[:, dim:].to(torch.float64)
        integral = per_probe.mean(dim=1)
        stderr = None
        if per_probe.shape[1] > 1:
            stderr = (per_probe.std(dim=1) / math.sqrt(per_probe.shape[1])).numpy()
        log_p0 = served.model.source.log_prob(latents.to(torch.float64))
        return {
            "log_prob": (log_p0 - integral).numpy(),
            "log_p0": log_p0.numpy(),
            "divergence_integral": integral.numpy(),
            "divergence_stderr": stderr,
            "latents": _shaped(served, latents.numpy()),
        }

    fields = await asyncio.to_thread(densities)
    served.metrics.samples.labels(served.model.name).inc(req.rows)
    body = {
        "model": served.model.name,
        "num_samples": req.rows,
        "num_steps": req.num_steps,
        "dim": dim,
        "solver": req.solver,
        "nfe": nfe,
        "divergence": method,
        "num_probes": probes,
        "seed": seed,
        **_shape_field(served),
        **conditioning.answer_fields(),
        **fields,
    }
    meta = {
        "model": served.model.name,
        "seed": seed,
        "num_steps": req.num_steps,
        "solver": req.solver,
        "nfe": nfe,
        **_scalar_echo(conditioning),
    }
    return Answer(body, meta=meta)
