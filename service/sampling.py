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

from service.engine import Divergence, Job, JobResult
from service.errors import DeadlineExceeded, InvalidInput, LimitExceeded, ModelFailed
from service.registry import Served
from service.schemas import EncodeRequest, LogProbRequest, SampleRequest, TrajectoryRequest
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

    @property
    def nbytes(self) -> int:
        """Size of the arrays in the answer (what encoding has to copy)."""
        return sum(v.nbytes for v in self.body.values() if isinstance(v, np.ndarray))


def _check_common(
    served: Served, rows: int, num_steps: int, solver: str, settings: Settings, field_name: str
) -> int:
    """Limits every request shares; returns the network evaluations per row (nfe)."""
    if rows > settings.max_samples:
        raise LimitExceeded(field_name, rows, settings.max_samples, "FLOW_MAX_SAMPLES")
    if num_steps > settings.max_steps:
        raise LimitExceeded("num_steps", num_steps, settings.max_steps, "FLOW_MAX_STEPS")
    nfe = num_steps * get_solver(solver).stages
    if rows * nfe > settings.max_row_steps:
        raise LimitExceeded(
            f"{field_name} x nfe", rows * nfe, settings.max_row_steps, "FLOW_MAX_ROW_STEPS"
        )
    return nfe


def _points(
    points: list[list[float]], served: Served, field_name: str, limit: float
) -> torch.Tensor:
    """(n, dim) float32 tensor on the model's device; 422 for the wrong dimension, or for
    coordinates past `limit`, where any network overflows float32 and answers would be NaN."""
    width = len(points[0])
    if width != served.model.dim:
        raise InvalidInput(
            f"{field_name}: points have {width} coordinates; model {served.model.name} has "
            f"dim {served.model.dim}",
        )
    with np.errstate(over="ignore"):
        array = np.asarray(points, dtype=np.float32)
    largest = float(np.abs(array).max())
    if not largest <= limit:
        raise InvalidInput(
            f"{field_name}: coordinates must lie within +-{limit:g} (FLOW_MAX_ABS_INPUT); "
            f"got {largest:.3g}",
        )
    return torch.from_numpy(array).to(served.model.device)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


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
    release = served.engine.reserve(rows)
    try:
        job = build if isinstance(build, Job) else await asyncio.to_thread(build)
        job.deadline = time.monotonic() + timeout_s
        watcher = None
        if disconnected is not None:
            watcher = asyncio.ensure_future(_cancel_when(disconnected, job))
        try:
            return await served.engine.run(job)
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
    nfe = _check_common(served, rows, req.num_steps, req.solver, settings, field_name)
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
    device = served.model.device

    def build() -> Job:
        z0 = _points(req.x0, served, "x0", settings.max_abs_input)
        return Job(z0=z0, solver=req.solver, num_steps=req.num_steps, keep=keep)

    def draw() -> torch.Tensor:
        return served.model.source.sample(rows, _generator(seed, device), device)

    if req.x0 is None:
        build = Job(
            z0=draw, rows=rows, width=dim, solver=req.solver, num_steps=req.num_steps, keep=keep
        )
    result = await execute(served, rows, build, _timeout(req.timeout_s, settings), disconnected)
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
    }
    array = states.numpy()
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
    }
    return Answer(body, array, meta)


async def encode(
    served: Served, req: EncodeRequest, settings: Settings, disconnected: Disconnected | None = None
) -> Answer:
    """POST /encode: integrate x from t = 1 back to t = 0."""
    nfe = _check_common(served, req.rows, req.num_steps, req.solver, settings, "x")

    def build() -> Job:
        x = _points(req.x, served, "x", settings.max_abs_input)
        return Job(z0=x, solver=req.solver, num_steps=req.num_steps, t0=1.0, t1=0.0)

    timeout = _timeout(req.timeout_s, settings)
    result = await execute(served, req.rows, build, timeout, disconnected)
    _check_finite(served, result)
    served.metrics.samples.labels(served.model.name).inc(req.rows)
    latents = result.final.numpy()
    body = {
        "model": served.model.name,
        "num_samples": req.rows,
        "num_steps": req.num_steps,
        "dim": served.model.dim,
        "solver": req.solver,
        "nfe": nfe,
        "latents": latents,
    }
    meta = {"model": served.model.name, "num_steps": req.num_steps, "solver": req.solver}
    return Answer(body, latents, {**meta, "nfe": nfe})


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
    nfe = _check_common(served, req.rows, req.num_steps, req.solver, settings, "x")
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
            bits = torch.randint(
                0, 2, (req.rows, probes, dim), generator=_generator(seed, device), device=device
            )
            eps = bits.to(torch.float32) * 2 - 1
        return Job(
            z0=z0,
            solver=req.solver,
            num_steps=req.num_steps,
            t0=1.0,
            t1=0.0,
            divergence=Divergence(method, columns),
            probes=eps,
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
            "latents": latents.numpy(),
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
        **fields,
    }
    meta = {
        "model": served.model.name,
        "seed": seed,
        "num_steps": req.num_steps,
        "solver": req.solver,
        "nfe": nfe,
    }
    return Answer(body, meta=meta)
