"""Step-level batching: every active row of every request advances in shared forward passes.

A request becomes a `Job`; its rows are split into units of at most `block_rows` rows. Units live
in lanes: one lane per (solver, kind of evaluation), where a lane keeps the per-row state of all
its units in one tensor, so a pass over a lane costs a fixed number of tensor operations however
many requests it holds. Each pass advances every selected unit by one stage of its own solver, at
its own time t and step h = (t1 - t0) / K: requests with different `num_steps`, directions and
solvers share passes. At most `max_batch_rows` rows are evaluated per pass, handed out one unit
at a time to each job in turn, so a small request is never stuck behind a large one.

Jobs that are cancelled (client gone) or past their deadline leave at the next pass. The maths of
a step is `service.solvers`' tableau; a lane only applies it to many rows at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from service.loader import LoadedModel
from service.solvers import Tableau, get_solver

log = logging.getLogger("flowserve.engine")


class EngineError(Exception):
    """Base of the errors a job can end with."""


class QueueFull(EngineError):
    def __init__(self, rows: int, queued: int, limit: int):
        super().__init__(
            f"queue full: {queued} rows admitted, this request adds {rows}, "
            f"the limit is {limit} (FLOW_MAX_QUEUE_ROWS); retry later"
        )


class DeadlineExceeded(EngineError):
    pass


class Cancelled(EngineError):
    pass


class EngineStopped(EngineError):
    pass


@dataclass(frozen=True)
class Divergence:
    """How a job's passes take div v: exact (d vector-Jacobian products) or Hutchinson probes."""

    method: str  # "exact" | "hutchinson"
    probes: int = 1


@dataclass(eq=False)
class Job:
    """One request's integration.

    z0: (n, m) start state on the engine's device: m = dim, or dim + columns of the divergence
    integral for likelihood jobs (the field's divergence is their slope). `keep`: step indices
    whose states a trajectory records (None: only the final state). `probes`: (n, P, dim)
    Hutchinson probes. `deadline`: a `time.monotonic()` instant.

    z0 may instead be a function that draws the (rows, width) start state: the engine calls it
    when it admits the job, on its own thread, so no torch work runs on the event loop.
    """

    z0: torch.Tensor | Callable[[], torch.Tensor]
    solver: str
    num_steps: int
    t0: float = 0.0
    t1: float = 1.0
    keep: list[int] | None = None
    divergence: Divergence | None = None
    probes: torch.Tensor | None = None
    deadline: float | None = None

    # Given with a z0 function, else read off z0. The engine lets go of z0 once it is in a lane.
    rows: int = 0
    width: int = 0
    final: torch.Tensor | None = None
    trajectory: torch.Tensor | None = None
    units_left: int = 0
    cancel_reason: str | None = None
    _future: asyncio.Future | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def __post_init__(self) -> None:
        if isinstance(self.z0, torch.Tensor):
            self.rows, self.width = (int(n) for n in self.z0.shape)

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to drop this job at its next pass (thread-safe: one attribute write)."""
        self.cancel_reason = reason


@dataclass(frozen=True)
class JobResult:
    """final: (n, m) end state on the CPU; trajectory: (kept, n, dim) on the CPU, or None;
    finite: False when either holds NaN or infinity."""

    final: torch.Tensor
    trajectory: torch.Tensor | None
    finite: bool


@dataclass(eq=False)
class _Unit:
    job: Job
    lane: _Lane
    job_start: int  # first row of this unit within its job
    rows: int
    offset: int = 0  # first row within the lane; moves when the lane compacts
    step: int = 0
    stage: int = 0
    keep_index: dict[int, int] | None = None
    dead: bool = False


@dataclass
class EngineStats:
    """Counters the tests and /metrics read."""

    passes: int = 0
    rows_evaluated: int = 0
    max_rows_in_pass: int = 0
    max_jobs_in_pass: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    rows_dropped: dict[str, int] = field(default_factory=dict)


class _Lane:
    """Per-row state of all units sharing a solver and a kind of evaluation.

    Columns of `state` (float32): x (m) | for multi-stage solvers: stage input y (m) and slope
    accumulator (m) | h | t0 | steps done | stage (multi-stage only) | Hutchinson probes (P*dim).
    For Euler the stage input is x itself.
    """

    def __init__(
        self,
        tableau: Tableau,
        m: int,
        dim: int,
        divergence: Divergence | None,
        device: torch.device,
        slope_fn: Callable,
    ):
        self.stages = tableau.stages
        self.slope_fn = slope_fn
        self._full: torch.Tensor | None = None
        self._full_columns: tuple[torch.Tensor, ...] = ()
        self.m = m
        self.multistage = tableau.stages > 1
        width = 3 * m + 4 if self.multistage else m + 3
        self.col_h = width - (4 if self.multistage else 3)
        self.probe_cols = (
            divergence.probes * dim if divergence and divergence.method != "exact" else 0
        )
        self.width = width + self.probe_cols
        self.device = device
        self.state = torch.zeros(0, self.width, device=device)
        self.rows = 0
        self.units: list[_Unit] = []
        stages = tableau.stages
        # Per-stage coefficient tables, indexed by a row's stage.
        self.c = torch.tensor(tableau.c, device=device)
        self.b = torch.tensor(tableau.b, device=device)
        self.a_next = torch.tensor([*tableau.a[1:], 0.0], device=device)
        self.last = torch.tensor([i == stages - 1 for i in range(stages)], device=device)

    def append(self, unit: _Unit, z: torch.Tensor, t0: float, h: float, probes) -> None:
        self._full = None
        needed = self.rows + unit.rows
        if needed > self.state.shape[0]:
            grown = torch.zeros(
                max(needed, 2 * self.state.shape[0], 64), self.width, device=self.device
            )
            grown[: self.rows] = self.state[: self.rows]
            self.state = grown
        block = self.state[self.rows : needed]
        block.zero_()
        m, col = self.m, self.col_h
        block[:, :m] = z
        if self.multistage:
            block[:, m : 2 * m] = z
        block[:, col] = h
        block[:, col + 1] = t0
        if self.probe_cols:
            block[:, self.width - self.probe_cols :] = probes.reshape(unit.rows, -1)
        unit.offset = self.rows
        self.rows = needed
        self.units.append(unit)

    def compact(self) -> None:
        """Drop the rows of finished or cancelled units, keeping the others in order."""
        alive = [u for u in self.units if not u.dead]
        if len(alive) == len(self.units):
            return
        self._full = None
        if alive:
            kept = self.state.index_select(0, _rows_of(alive, self.device))
            self.state[: kept.shape[0]] = kept
        offset = 0
        for unit in alive:
            unit.offset = offset
            offset += unit.rows
        self.rows = offset
        self.units = alive
        if self.state.shape[0] > 64 and self.rows < self.state.shape[0] // 4:
            self.state = self.state[: max(self.rows * 2, 64)].clone()

    def advance(self, s: torch.Tensor) -> None:
        """One stage for every row of `s` (a block of `state`, updated in place)."""
        m, col = self.m, self.col_h
        if not self.multistage:
            if s is self._full:  # the common case: reuse the column views of the whole lane
                x, h, t0, steps = self._full_columns
            else:
                x, h, t0, steps = self._euler_columns(s)
            t = torch.addcmul(t0, steps, h)
            x.addcmul_(h, self.slope_fn(t, x, s))
            steps.add_(1.0)
            return
        h = s[:, col : col + 1]
        t0 = s[:, col + 1 : col + 2]
        steps = s[:, col + 2 : col + 3]
        base, y, acc = s[:, :m], s[:, m : 2 * m], s[:, 2 * m : 3 * m]
        stage_col = s[:, col + 3]
        stage = stage_col.long()
        t = torch.addcmul(t0, steps + self.c[stage].unsqueeze(1), h)
        slope = self.slope_fn(t, y, s)
        acc.addcmul_(self.b[stage].unsqueeze(1), slope)
        last = self.last[stage].unsqueeze(1)
        new_base = torch.addcmul(base, h, acc)
        stage_input = torch.addcmul(base, h * self.a_next[stage].unsqueeze(1), slope)
        base.copy_(torch.where(last, new_base, base))
        y.copy_(torch.where(last, new_base, stage_input))
        acc.masked_fill_(last, 0.0)
        steps.add_(last.to(steps.dtype))
        stage_col.copy_(torch.where(last.squeeze(1), 0.0, stage_col + 1))

    def _euler_columns(self, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
        col = self.col_h
        return s[:, : self.m], s[:, col : col + 1], s[:, col + 1 : col + 2], s[:, col + 2 : col + 3]

    def full(self) -> torch.Tensor:
        """The state of every row of the lane (a view, cached until rows come or go)."""
        if self._full is None:
            self._full = self.state[: self.rows]
            if not self.multistage:
                self._full_columns = self._euler_columns(self._full)
        return self._full


class Engine:
    """Batches the integrations of one model. `run` is awaited from the event loop; all torch
    work happens on the engine's own thread."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch_rows: int,
        block_rows: int,
        max_queue_rows: int,
        chunk_rows: int | None = None,
        single_thread_rows: int = 0,
        fused_min_rows: int = 0,
        on_pass: Callable[[int], None] | None = None,
        on_drop: Callable[[str, int], None] | None = None,
    ):
        if block_rows > max_batch_rows:
            raise ValueError(
                f"block_rows ({block_rows}) must not exceed max_batch_rows ({max_batch_rows})"
            )
        self.model = model
        self.max_batch_rows = max_batch_rows
        self.block_rows = block_rows
        self.max_queue_rows = max_queue_rows
        self.chunk_rows = chunk_rows or max_batch_rows
        self.single_thread_rows = single_thread_rows
        self.fused_min_rows = fused_min_rows
        self._threads = torch.get_num_threads()
        self.stats = EngineStats()
        self._on_pass = on_pass
        self._on_drop = on_drop
        self._cond = threading.Condition()
        self._pending: list[Job] = []
        self._jobs: list[Job] = []
        self._units: dict[Job, deque[_Unit]] = {}
        self._lanes: dict[tuple, _Lane] = {}
        self._queued_rows = 0
        self._stopping = False
        self._rotation = itertools.count()
        self._thread = threading.Thread(
            target=self._serve, name=f"engine-{model.name}", daemon=True
        )

    # ----------------------------------------------------------------- interface

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Fail what is still queued or running and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queued_rows(self) -> int:
        """Rows admitted and not yet finished (waiting or running)."""
        return self._queued_rows

    @property
    def queued_jobs(self) -> int:
        return len(self._pending) + len(self._jobs)

    def reserve(self, rows: int) -> Callable[[], None]:
        """Admit `rows` into the bounded queue or raise QueueFull; returns an idempotent release."""
        with self._cond:
            if self._stopping:
                raise EngineStopped("the service is shutting down")
            if self._queued_rows + rows > self.max_queue_rows:
                raise QueueFull(rows, self._queued_rows, self.max_queue_rows)
            self._queued_rows += rows
        released = False

        def release() -> None:
            nonlocal released
            with self._cond:
                if not released:
                    released = True
                    self._queued_rows -= rows

        return release

    async def run(self, job: Job) -> JobResult:
        """Integrate `job`; cancelling the awaiting task drops the job at the next pass."""
        loop = asyncio.get_running_loop()
        job._future = loop.create_future()
        job._loop = loop
        with self._cond:
            if self._stopping:
                raise EngineStopped("the service is shutting down")
            self._pending.append(job)
            self._cond.notify()
        try:
            return await job._future
        except asyncio.CancelledError:
            job.cancel("disconnect")
            raise

    # ----------------------------------------------------------------- worker

    def _serve(self) -> None:
        torch.set_grad_enabled(False)  # thread-local: passes that need autograd enable it
        while True:
            with self._cond:
                while not (self._pending or self._jobs or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                arrived, self._pending = self._pending, []
            try:
                for job in arrived:
                    self._admit(job)
                self._drop_stale()
                if self._jobs:
                    self._pass()
            except Exception as exc:  # a failing model must not kill the thread
                log.exception("engine pass failed")
                for job in list(self._jobs):
                    self._fail(job, EngineError(f"model evaluation failed: {exc}".splitlines()[0]))
        with self._cond:
            leftover, self._pending = self._pending, []
        for job in leftover + list(self._jobs):
            self._fail(job, EngineStopped("the service is shutting down"))

    def _lane(self, job: Job) -> _Lane:
        m = job.width
        key = (job.solver, m, job.divergence)
        lane = self._lanes.get(key)
        if lane is None:
            slope_fn = self._slope_fn(job.divergence)
            lane = _Lane(
                get_solver(job.solver),
                m,
                self.model.dim,
                job.divergence,
                self.model.device,
                slope_fn,
            )
            self._lanes[key] = lane
        return lane

    def _admit(self, job: Job) -> None:
        if job.cancel_reason is not None:
            self._fail(job, Cancelled(job.cancel_reason), reason=job.cancel_reason)
            return
        if not isinstance(job.z0, torch.Tensor):
            try:
                job.z0 = job.z0()
            except Exception as exc:
                self._fail(job, EngineError(f"drawing start points failed: {exc}"))
                return
        lane = self._lane(job)
        h = (job.t1 - job.t0) / job.num_steps
        dim = self.model.dim
        job.final = torch.empty_like(job.z0)
        keep_index = None
        if job.keep is not None:
            keep_index = {step: i for i, step in enumerate(job.keep)}
            job.trajectory = torch.empty(len(job.keep), job.rows, dim, device=job.z0.device)
            job.trajectory[0] = job.z0[:, :dim]
        units = deque()
        for start in range(0, job.rows, self.block_rows):
            rows = min(self.block_rows, job.rows - start)
            unit = _Unit(job=job, lane=lane, job_start=start, rows=rows, keep_index=keep_index)
            probes = job.probes[start : start + rows] if job.probes is not None else None
            lane.append(unit, job.z0[start : start + rows], job.t0, h, probes)
            units.append(unit)
        job.units_left = len(units)
        job.z0 = job.probes = None
        self._units[job] = units
        self._jobs.append(job)

    def _drop_stale(self) -> None:
        now = time.monotonic()
        for job in list(self._jobs):
            if job.cancel_reason is not None:
                self._fail(job, Cancelled(job.cancel_reason), reason=job.cancel_reason)
            elif job.deadline is not None and now > job.deadline:
                self._fail(job, DeadlineExceeded("deadline passed"), reason="deadline")

    def _select(self) -> list[_Unit]:
        """Hand out up to max_batch_rows rows, one unit per job in turn."""
        total = sum(lane.rows for lane in self._lanes.values())
        if total <= self.max_batch_rows:
            return [u for units in self._units.values() for u in units]
        budget = self.max_batch_rows
        jobs = [job for job in self._jobs if self._units[job]]
        start = next(self._rotation) % len(jobs)
        order = jobs[start:] + jobs[:start]
        taken: dict[Job, int] = dict.fromkeys(order, 0)
        selected = []
        progress = True
        while progress:
            progress = False
            for job in order:
                units = self._units[job]
                if taken[job] < len(units) and units[taken[job]].rows <= budget:
                    unit = units[taken[job]]
                    taken[job] += 1
                    selected.append(unit)
                    budget -= unit.rows
                    progress = True
        for job, count in taken.items():
            self._units[job].rotate(-count)
        return selected

    def _pass(self) -> None:
        selected = self._select()
        # Small passes run faster on one thread than paying for the others' synchronisation.
        small = sum(unit.rows for unit in selected) < self.single_thread_rows
        threads = 1 if small else self._threads
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        by_lane: dict[_Lane, list[_Unit]] = {}
        for unit in selected:
            by_lane.setdefault(unit.lane, []).append(unit)
        rows = 0
        for lane, units in by_lane.items():
            try:
                rows += self._advance_lane(lane, units)
            except Exception as exc:  # only the jobs in the failing lane pay for it
                log.exception("forward pass failed for model %s", self.model.name)
                error = EngineError(f"model evaluation failed: {exc}".splitlines()[0])
                for job in {unit.job for unit in units}:
                    self._fail(job, error)
        selected = [unit for unit in selected if not unit.dead]
        stats = self.stats
        stats.passes += 1
        stats.rows_evaluated += rows
        stats.max_rows_in_pass = max(stats.max_rows_in_pass, rows)
        stats.max_jobs_in_pass = max(stats.max_jobs_in_pass, len({u.job for u in selected}))
        if self._on_pass is not None:
            self._on_pass(rows)
        finished = False
        for unit in selected:
            finished |= self._after_stage(unit)
        if finished:
            for lane in self._lanes.values():
                lane.compact()
            for job in [job for job in self._jobs if job.units_left == 0]:
                self._finish(job)

    def _advance_lane(self, lane: _Lane, units: list[_Unit]) -> int:
        """One stage for `units`' rows: in place when they are one run of rows of the lane
        (always so when all of it is selected), else gathered and written back."""
        if len(units) == len(lane.units):
            self._advance_rows(lane, lane.full())
            return lane.rows
        units = sorted(units, key=lambda u: u.offset)
        start = units[0].offset
        end = start
        for unit in units:
            if unit.offset != end:
                break
            end += unit.rows
        else:
            self._advance_rows(lane, lane.state[start:end])
            return end - start
        index = _rows_of(units, lane.device)
        block = lane.state.index_select(0, index)
        self._advance_rows(lane, block)
        lane.state.index_copy_(0, index, block)
        return int(index.shape[0])

    def _advance_rows(self, lane: _Lane, block: torch.Tensor) -> None:
        # Rows are independent: cache-sized chunks keep each layer's activations resident.
        chunk = self.chunk_rows
        if block.shape[0] <= chunk:
            lane.advance(block)
            return
        for first in range(0, block.shape[0], chunk):
            lane.advance(block[first : first + chunk])

    def _slope_fn(self, divergence: Divergence | None) -> Callable:
        model = self.model
        if divergence is None:
            # The bound method skips nn.Module's call machinery (a third of a small pass);
            # grad mode is off for the whole engine thread.
            # Small passes take the unfused graph where the model has one (see fastpath).
            forward = _bound_forward(model.module)
            small = model.unfused_module
            unfused = forward if small is None else _bound_forward(small)
            min_rows = self.fused_min_rows

            def plain(t, y, _block):
                return (forward if y.shape[0] >= min_rows else unfused)(t, y)

            return plain
        dim = model.dim

        def with_divergence(t, y, block):
            x = y[:, :dim].detach().requires_grad_(True)
            exact = divergence.method == "exact"
            columns = 1 if exact else divergence.probes
            div = torch.zeros(x.shape[0], columns, device=x.device)
            # Op by op, without the executor's differentiable plans: with the process-wide
            # oneDNN fuser on, those fail to run (a TorchScript fault, not the model's).
            with torch.enable_grad(), torch.jit.optimized_execution(False):
                v = model.autograd_module(t, x)
                if not v.requires_grad:  # a field that does not depend on x: div v = 0
                    return torch.cat([v, div], dim=1)

                def vjp(outputs, weights, last: bool) -> torch.Tensor:
                    (grad,) = torch.autograd.grad(
                        outputs, x, grad_outputs=weights, retain_graph=not last, allow_unused=True
                    )
                    return torch.zeros_like(x) if grad is None else grad

                if exact:
                    ones = torch.ones(x.shape[0], device=x.device)
                    for i in range(dim):
                        div[:, 0] += vjp(v[:, i], ones, i == dim - 1)[:, i]
                else:
                    # The probes ride in the last columns of the lane's state.
                    eps = block[:, block.shape[1] - columns * dim :].reshape(-1, columns, dim)
                    for p in range(columns):
                        grad = vjp(v, eps[:, p], p == columns - 1)
                        div[:, p] = (grad * eps[:, p]).sum(dim=1)
            return torch.cat([v.detach(), div], dim=1)

        return with_divergence

    def _after_stage(self, unit: _Unit) -> bool:
        """Mirror one stage in the unit's bookkeeping; record kept states; True when it finished.

        Runs for every unit of every pass, so tensors are touched only when a state is kept."""
        unit.stage += 1
        if unit.stage < unit.lane.stages:
            return False
        unit.stage = 0
        unit.step += 1
        job = unit.job
        keep = unit.keep_index is not None and unit.step in unit.keep_index
        done = unit.step >= job.num_steps
        if not (keep or done):
            return False
        lane = unit.lane
        rows = lane.state[unit.offset : unit.offset + unit.rows]
        first, last = unit.job_start, unit.job_start + unit.rows
        if keep:
            job.trajectory[unit.keep_index[unit.step], first:last] = rows[:, : self.model.dim]
        if not done:
            return False
        job.final[first:last] = rows[:, : lane.m]
        unit.dead = True
        self._units[job].remove(unit)
        job.units_left -= 1
        return True

    def _remove(self, job: Job) -> None:
        if job in self._units:
            for unit in self._units.pop(job):
                unit.dead = True
            for lane in self._lanes.values():
                lane.compact()
        if job in self._jobs:
            self._jobs.remove(job)

    def _finish(self, job: Job) -> None:
        self._remove(job)
        states = job.final if job.trajectory is None else job.trajectory
        result = JobResult(
            final=job.final.cpu(),
            trajectory=job.trajectory.cpu() if job.trajectory is not None else None,
            finite=bool(torch.isfinite(states).all()),
        )
        job.final = job.trajectory = None
        self.stats.jobs_done += 1
        self._resolve(job, result=result)

    def _fail(self, job: Job, error: EngineError, reason: str | None = None) -> None:
        if reason is not None:
            unfinished = sum(u.rows for u in self._units.get(job, ()))
            self.stats.rows_dropped[reason] = self.stats.rows_dropped.get(reason, 0) + unfinished
            if self._on_drop is not None:
                self._on_drop(reason, unfinished)
        self._remove(job)
        job.final = job.trajectory = None
        self.stats.jobs_failed += 1
        self._resolve(job, error=error)

    @staticmethod
    def _resolve(
        job: Job, *, result: JobResult | None = None, error: Exception | None = None
    ) -> None:
        future, loop = job._future, job._loop
        if future is None or loop is None:
            return

        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            loop.call_soon_threadsafe(settle)


def _bound_forward(module: Callable) -> Callable:
    return module.forward if hasattr(module, "forward") else module


def _rows_of(units: list[_Unit], device: torch.device) -> torch.Tensor:
    """The lane rows of `units`, in their order: (sum of rows,) int64 on `device`."""
    rows = np.concatenate([np.arange(u.offset, u.offset + u.rows) for u in units])
    return torch.from_numpy(rows).to(device)
