"""Step-level batching: every active row of every request advances in shared forward passes.

A request becomes a `Job`; its rows are split into units of at most `block_rows` rows. Units live
in lanes (`service.lanes`): one lane per solver, kind of evaluation, condition width and
guidance, where a lane keeps the per-row state of all its units in one tensor. Each pass
advances every selected unit by one stage of its own solver, at its own time t and step
h = (t1 - t0) / K: requests with different `num_steps`, directions, solvers, labels and guidance
scales share passes. `service.scheduler` picks at most `max_batch_rows` rows of network work per
pass, one unit per job in turn, so a small request is never stuck behind a large one.

Jobs that are cancelled (client gone) or past their deadline leave at the next pass. The maths of
a step is `service.solvers`' stage rule; the network is called only through the model's
`VelocityField`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from service.errors import (
    Cancelled,
    DeadlineExceeded,
    EngineFailed,
    EngineStopped,
    ModelFailed,
    QueueFull,
    ServiceError,
    one_line,
)
from service.lanes import Lane, Layout, Slope, Unit, rows_of
from service.loader import LoadedModel
from service.scheduler import fair_share
from service.solvers import get_solver

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "Divergence",
    "Draw",
    "Engine",
    "EngineFailed",
    "EngineStats",
    "EngineStopped",
    "Job",
    "JobResult",
    "ModelFailed",
    "QueueFull",
]

log = logging.getLogger("flowserve.engine")


@dataclass(frozen=True)
class Divergence:
    """How a job's passes take div v: exact (d vector-Jacobian products) or Hutchinson probes."""

    method: str  # "exact" | "hutchinson"
    probes: int = 1


@dataclass(frozen=True)
class Draw:
    """Start points to draw from the model's source: `rows` of them, from a generator seeded by
    `seed` on the engine's device. The engine draws them when it admits the job, on its own
    thread (no torch work on the event loop), and a seed gives the same points wherever the
    engine runs (in this process or its own)."""

    seed: int
    rows: int


@dataclass(eq=False)
class Job:
    """One request's integration.

    z0: (n, m) start state on the engine's device: m = dim, or dim + columns of the divergence
    integral for likelihood jobs (the field's divergence is their slope). `keep`: step indices
    whose states a trajectory records (None: only the final state). `probes`: (n, P, dim)
    Hutchinson probes. `deadline`: a `time.monotonic()` instant.

    z0 may instead be a `Draw`: the engine draws the start points from the model's source.

    condition: (n, width) float32, the condition of every row as the field reads it (a class
    index, or a vector; an expanded view is fine), or None for an unconditional model.
    guidance: the scale w of classifier-free guidance, or None for the field itself (w = 1).
    velocity: the job asks for the field, not a path: z0 is [x, 0] (n, 2 dim), and one Euler
    step of length 1 leaves x in place and writes v(t0, x) into the zeros, exactly.
    """

    z0: torch.Tensor | Draw
    solver: str
    num_steps: int
    t0: float = 0.0
    t1: float = 1.0
    keep: list[int] | None = None
    divergence: Divergence | None = None
    probes: torch.Tensor | None = None
    deadline: float | None = None
    condition: torch.Tensor | None = None
    guidance: float | None = None
    velocity: bool = False

    # Given with a Draw, else read off z0. The engine lets go of z0 once it is in a lane.
    rows: int = 0
    width: int = 0
    final: torch.Tensor | None = None
    trajectory: torch.Tensor | None = None
    units_left: int = 0
    cancel_reason: str | None = None
    on_cancel: Callable[[str], None] | None = None  # told of cancel() (the engine elsewhere)
    on_engine_cancel: Callable[[], None] | None = None
    """Told of cancel() after the reason is set: set by the engine the job was submitted to, so
    its passes look for cancelled jobs only when there is one."""
    on_done: Callable[[JobResult | None, Exception | None], None] | None = None
    """Told of the job's end instead of an awaiting task (`Engine.submit`): (result, None) or
    (None, error), on the engine's thread, or on the thread that gave up on the engine."""
    _future: asyncio.Future | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def __post_init__(self) -> None:
        if isinstance(self.z0, torch.Tensor):
            self.rows, self.width = (int(n) for n in self.z0.shape)
        elif isinstance(self.z0, Draw) and not self.rows:
            self.rows = self.z0.rows

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to drop this job at its next pass (thread-safe: one attribute write)."""
        self.cancel_reason = reason
        if self.on_cancel is not None:
            self.on_cancel(reason)
        if self.on_engine_cancel is not None:
            self.on_engine_cancel()


@dataclass(frozen=True)
class JobResult:
    """final: (n, m) end state on the CPU; trajectory: (kept, n, dim) on the CPU, or None."""

    final: torch.Tensor
    trajectory: torch.Tensor | None

    @functools.cached_property
    def finite(self) -> bool:
        """False when the answer holds NaN or infinity. Checked where the answer is read (the
        HTTP side), not on the engine's thread, which has every other request's passes to run."""
        return _finite(self.final if self.trajectory is None else self.trajectory)


@dataclass
class EngineStats:
    """Counters of the engine's own work, read by the tests (`/metrics` gets its figures through
    the `on_pass` and `on_drop` callbacks)."""

    passes: int = 0
    rows_evaluated: int = 0
    max_rows_in_pass: int = 0
    max_jobs_in_pass: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    rows_dropped: dict[str, int] = field(default_factory=dict)
    model_errors: int = 0  # jobs failed because the model raised or answered the wrong thing


class EngineClient(Protocol):
    """What the HTTP side needs of one model's engine: `Engine` (in this process, a thread) and
    `service.remote.RemoteEngine` (in the engine process, over a socket) both answer it.

    Cancelling goes through the job: `job.cancel(reason)` drops its rows at the next pass, and
    reaches the engine process when the engine is there (`Job.on_cancel`)."""

    clock: Callable[[], float]

    def reserve(self, rows: int) -> Callable[[], None]:
        """Admit `rows` against the bounded queue (QueueFull past it); the returned function
        gives them back."""
        ...

    async def run(self, job: Job) -> JobResult:
        """Run `job` to its end: its result, or the engine's error (deadline, model failure,
        engine gone)."""
        ...

    def health(self, stall_s: float) -> str | None:
        """None while the engine works; else why not (it died, or stalled for `stall_s`)."""
        ...

    @property
    def queued_rows(self) -> int: ...

    @property
    def queued_jobs(self) -> int: ...

    @property
    def stats(self) -> Any:
        """The engine's own counters (`EngineStats`' fields)."""
        ...


class Engine:
    """Batches the integrations of one model. `run` is awaited from the event loop; all torch
    work happens on the engine's own thread.

    Faults: a model that fails on a pass fails only the requests whose own rows fail (the others
    are retried alone and go on); anything else that escapes a pass, or a device error, kills
    the engine: its jobs fail with EngineFailed (503), `failure` says why, and whoever holds
    the engine (`service.registry`) replaces it. `health` also reports an engine that makes no
    progress while work waits. `clock` (time.monotonic) times deadlines and progress; tests
    give a clock of their own.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch_rows: int,
        block_rows: int,
        max_queue_rows: int,
        chunk_rows: int | None = None,
        single_thread_rows: int = 0,
        on_pass: Callable[[int], None] | None = None,
        on_pass_jobs: Callable[[int], None] | None = None,
        on_drop: Callable[[str, int], None] | None = None,
        on_model_error: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
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
        self._threads = torch.get_num_threads()
        self.stats = EngineStats()
        self._on_pass = on_pass
        self._on_pass_jobs = on_pass_jobs
        self._on_drop = on_drop
        self._on_model_error = on_model_error
        self.clock = clock
        self.failure: str | None = None
        """Why the engine died (None while it runs); set once, by the engine thread or by
        `abandon`."""
        self.last_progress = clock()
        """When the engine thread last finished a pass or found nothing to do."""
        self._cond = threading.Condition()
        self._pending: list[Job] = []
        self._jobs: list[Job] = []
        self._units: dict[Job, deque[Unit]] = {}
        self._lanes: dict[tuple, Lane] = {}
        self._queued_rows = 0
        self._cancels = 0
        """Jobs cancelled so far (`Job.cancel`, from any thread): `_drop_stale` looks at every job
        only when it moved, or when the earliest deadline has passed."""
        self._cancels_seen = 0
        self._next_deadline = math.inf
        self._stopping = False
        self._rotation = itertools.count()
        self._thread = threading.Thread(
            target=self._serve, name=f"engine-{model.name}", daemon=True
        )

    # ----------------------------------------------------------------- interface

    def start(self) -> None:
        """Serve on a thread of the engine's own. An engine never started is driven instead:
        its owner calls `turn` from one thread of its own (`service.engine_process`)."""
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Fail what is still queued or running and end the thread (for a driven engine: call it
        from the driving thread, which fails what is left here and now)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.ident is None:
            self._fail_leftovers()
        elif self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def has_work(self) -> bool:
        """Jobs wait or run, and the engine serves (a driven engine's owner then calls `turn`)."""
        return bool(self._pending or self._jobs) and not self._stopping

    def turn(self) -> None:
        """For a driven engine: admit what arrived, drop what went stale, run one pass. An error
        that escapes kills the engine as it would kill its thread (`failure` says why)."""
        try:
            self._turn()
        except BaseException as exc:
            self._die(exc)

    @property
    def queued_rows(self) -> int:
        """Rows admitted and not yet finished (waiting or running)."""
        return self._queued_rows

    @property
    def queued_jobs(self) -> int:
        """Jobs queued or running. Read without the lock: while the engine thread admits what
        arrived, those jobs are in neither list, so a read then can be short for a moment."""
        return len(self._pending) + len(self._jobs)

    def health(self, stall_s: float) -> str | None:
        """None while the engine serves; else why not: it died, or work has waited more than
        `stall_s` seconds without a pass finishing."""
        if self.failure is not None:
            return self.failure
        if self._thread.ident is not None and not self._thread.is_alive() and not self._stopping:
            return "the engine thread ended"
        if self.queued_jobs and self.clock() - self.last_progress > stall_s:
            waited = self.clock() - self.last_progress
            return f"no pass finished for {waited:.0f} s while {self.queued_jobs} requests waited"
        return None

    def abandon(self, reason: str) -> None:
        """Give up on this engine (dead or stuck): every request waiting on it fails now with
        EngineFailed, and it takes no new work. A thread stuck in a pass is left to finish it;
        whatever it settles later is already settled."""
        with self._cond:
            if self.failure is None:
                self.failure = reason
            self._stopping = True
            waiting = list(self._pending) + list(self._jobs)
            self._cond.notify()
        error = self._failed_error()
        for job in waiting:
            self._resolve(job, error=error)

    def _failed_error(self) -> EngineFailed:
        return EngineFailed(
            f"model {self.model.name}: its engine failed ({self.failure}); it is being "
            "restarted, retry"
        )

    def reserve(self, rows: int) -> Callable[[], None]:
        """Admit `rows` into the bounded queue or raise QueueFull; returns an idempotent release."""
        with self._cond:
            if self.failure is not None:
                raise self._failed_error()
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

    def enqueue(self, job: Job) -> None:
        """Queue `job` for the engine thread (the first half of `run`, which awaits it)."""
        loop = asyncio.get_running_loop()
        job._future = loop.create_future()
        # The engine may settle the future after this wait gave up on it (deadline, disconnect).
        job._future.add_done_callback(_retrieve)
        job._loop = loop
        self.submit(job)

    def submit(self, job: Job) -> None:
        """Queue `job`; its end reaches `job.on_done` (or the future `enqueue` gave it). Raises
        the engine's error when it takes no work."""
        job.on_engine_cancel = self._cancelled
        with self._cond:
            if self.failure is not None:
                raise self._failed_error()
            if self._stopping:
                raise EngineStopped("the service is shutting down")
            self._pending.append(job)
            self._cond.notify()

    def _cancelled(self) -> None:
        # Any thread. Two at once may count one, but the count moves, which is all that is read.
        self._cancels += 1

    async def run(self, job: Job) -> JobResult:
        """Integrate `job`; cancelling the awaiting task drops the job at the next pass.

        The wait ends at the job's deadline whatever the engine thread does: the job is then
        dropped at the engine's next pass, and DeadlineExceeded is raised here at once."""
        self.enqueue(job)
        return await self.result(job)

    async def result(self, job: Job) -> JobResult:
        """The answer of a job `enqueue` queued (the second half of `run`)."""
        timeout = None if job.deadline is None else max(0.0, job.deadline - self.clock())
        try:
            return await asyncio.wait_for(asyncio.shield(job._future), timeout)
        except TimeoutError:
            job.cancel("deadline")
            raise DeadlineExceeded("deadline passed") from None
        except asyncio.CancelledError:
            job.cancel("disconnect")
            raise

    # ----------------------------------------------------------------- worker

    def _serve(self) -> None:
        torch.set_grad_enabled(False)  # thread-local: passes that need autograd enable it
        try:
            self._loop()
        except BaseException as exc:
            self._die(exc)
            return
        self._fail_leftovers()

    def _die(self, exc: BaseException) -> None:
        """Something escaped a pass: the engine is dead; say why and fail what waits on it."""
        reason = f"{type(exc).__name__}: {one_line(exc)}"
        log.error("engine of model %s died: %s", self.model.name, reason)
        self.abandon(reason)

    def _fail_leftovers(self) -> None:
        with self._cond:
            leftover, self._pending = self._pending, []
        for job in leftover + list(self._jobs):
            self._fail(job, EngineStopped("the service is shutting down"))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._jobs or self._stopping):
                    self.last_progress = self.clock()
                    self._cond.wait()
                if self._stopping:
                    return
            self._turn()

    def _turn(self) -> None:
        with self._cond:
            arrived, self._pending = self._pending, []
        for job in arrived:
            self._admit(job)
        self._drop_stale()
        if self._jobs:
            self._pass()
        self.last_progress = self.clock()

    def _lane(self, job: Job) -> Lane:
        condition_width = 0 if job.condition is None else int(job.condition.shape[1])
        guided = job.guidance is not None
        key = (job.solver, job.width, job.divergence, condition_width, guided, job.velocity)
        lane = self._lanes.get(key)
        if lane is None:
            tableau = get_solver(job.solver)
            divergence = job.divergence
            probes = 0
            if divergence is not None and divergence.method != "exact":
                probes = divergence.probes * self.model.dim
            layout = Layout.build(job.width, tableau.stages, condition_width, guided, probes)
            lane = Lane(
                tableau,
                layout,
                self.model.device,
                self._slope(layout, divergence, job.velocity),
                evaluations=2 if guided else 1,
            )
            self._lanes[key] = lane
        return lane

    def _admit(self, job: Job) -> None:
        if job.cancel_reason is not None:
            self._fail(job, Cancelled(job.cancel_reason), reason=job.cancel_reason)
            return
        if isinstance(job.z0, Draw):
            device = self.model.device
            generator = torch.Generator(device=device).manual_seed(job.z0.seed)
            try:
                job.z0 = self.model.source.sample(job.z0.rows, generator, device)
            except Exception as exc:
                self._fail(job, ModelFailed(f"drawing start points failed: {one_line(exc)}"))
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
            unit = Unit(job=job, lane=lane, job_start=start, rows=rows, keep_index=keep_index)
            unit.next_event = _next_event(unit, job.num_steps)
            part = slice(start, start + rows)
            lane.append(
                unit,
                job.z0[part],
                job.t0,
                h,
                probes=None if job.probes is None else job.probes[part],
                condition=None if job.condition is None else job.condition[part],
                guidance=job.guidance,
            )
            units.append(unit)
        job.units_left = len(units)
        job.z0 = job.probes = job.condition = None
        self._units[job] = units
        self._jobs.append(job)
        if job.deadline is not None:
            self._next_deadline = min(self._next_deadline, job.deadline)

    def _drop_stale(self) -> None:
        """Fail the jobs cancelled or past their deadline. Every job is looked at only when one
        was cancelled since the last look or the earliest deadline has passed."""
        now = self.clock()
        cancels = self._cancels
        if cancels == self._cancels_seen and now <= self._next_deadline:
            return
        self._cancels_seen = cancels
        upcoming = math.inf
        for job in list(self._jobs):
            if job.cancel_reason is not None:
                self._fail(job, Cancelled(job.cancel_reason), reason=job.cancel_reason)
            elif job.deadline is not None:
                if now > job.deadline:
                    self._fail(job, DeadlineExceeded("deadline passed"), reason="deadline")
                else:
                    upcoming = min(upcoming, job.deadline)
        self._next_deadline = upcoming

    def _select(self) -> tuple[list[Unit], int | None]:
        """Every unit when all fit in a pass, with their network rows; else a fair share
        (`service.scheduler`) and None."""
        total = sum(lane.rows * lane.evaluations for lane in self._lanes.values())
        if total <= self.max_batch_rows:
            return [u for units in self._units.values() for u in units], total
        jobs = [job for job in self._jobs if self._units[job]]
        start = next(self._rotation) % len(jobs)
        return fair_share(self._units, jobs[start:] + jobs[:start], self.max_batch_rows), None

    def _pass(self) -> None:
        selected, cost = self._select()
        everything = cost is not None
        if everything:  # every unit of every lane: no grouping, and the cost is at hand
            # Copies: a job that fails alone in `_advance_alone` leaves its lane mid-pass.
            by_lane = {lane: list(lane.units) for lane in self._lanes.values() if lane.units}
        else:
            by_lane = {}
            for unit in selected:
                by_lane.setdefault(unit.lane, []).append(unit)
            cost = sum(unit.cost for unit in selected)
        # Small passes run faster on one thread than paying for the others' synchronisation.
        threads = 1 if cost < self.single_thread_rows else self._threads
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        rows = 0
        failed = False
        for lane, units in by_lane.items():
            try:
                rows += self._advance_lane(lane, units)
            except Exception as exc:
                if _device_fault(exc):
                    raise  # the device is unusable: the engine dies and is replaced
                rows += self._advance_alone(lane, units)
                failed = True
        if failed:  # a job that failed alone has left
            selected = [unit for unit in selected if not unit.dead]
        stats = self.stats
        stats.passes += 1
        stats.rows_evaluated += rows
        stats.max_rows_in_pass = max(stats.max_rows_in_pass, rows)
        jobs = len(self._jobs) if everything else len({u.job for u in selected})
        stats.max_jobs_in_pass = max(stats.max_jobs_in_pass, jobs)
        if self._on_pass is not None:
            self._on_pass(rows)
        if self._on_pass_jobs is not None:
            self._on_pass_jobs(jobs)
        finished = []
        for unit in selected:
            unit.done += 1
            if unit.done >= unit.next_event and self._at_event(unit) and not unit.job.units_left:
                finished.append(unit.job)
        if finished:
            for lane in self._lanes.values():
                lane.compact()
            for job in finished:
                self._finish(job)

    def _advance_lane(self, lane: Lane, units: list[Unit]) -> int:
        """One stage for `units`' rows: in place when they are one run of rows of the lane
        (always so when all of it is selected), else gathered and written back. Returns the rows
        put through the network."""
        if len(units) == len(lane.units):
            self._advance_rows(lane, lane.full())
            return lane.rows * lane.evaluations
        units = sorted(units, key=lambda u: u.offset)
        start = units[0].offset
        end = start
        for unit in units:
            if unit.offset != end:
                break
            end += unit.rows
        else:
            self._advance_rows(lane, lane.state[start:end])
            return (end - start) * lane.evaluations
        index = rows_of(units, lane.device)
        block = lane.state.index_select(0, index)
        self._advance_rows(lane, block)
        lane.state.index_copy_(0, index, block)
        return int(index.shape[0]) * lane.evaluations

    def _advance_alone(self, lane: Lane, units: list[Unit]) -> int:
        """A pass over `units` failed. Their rows that did not advance (a failure part way
        through a chunked pass leaves some that did) are advanced again job by job; a job whose
        own rows fail fails alone, with one log line. Returns the rows put through the network."""
        rows = 0
        for job in dict.fromkeys(unit.job for unit in units):
            mine = [unit for unit in units if unit.job is job]
            index = rows_of(mine, lane.device)
            done = lane.progress(lane.state.index_select(0, index))
            before = np.repeat([u.done for u in mine], [u.rows for u in mine])
            index = index[done == torch.from_numpy(before).to(done)]
            if index.numel() == 0:
                continue
            block = lane.state.index_select(0, index)
            try:
                self._advance_rows(lane, block)
            except Exception as exc:
                if _device_fault(exc):
                    raise
                self._model_error(job, exc)
                continue
            lane.state.index_copy_(0, index, block)
            rows += int(index.numel()) * lane.evaluations
        return rows

    def _model_error(self, job: Job, exc: Exception) -> None:
        reason = one_line(exc)
        log.error(
            "model %s failed on the %d rows of one request: %s", self.model.name, job.rows, reason
        )
        self.stats.model_errors += 1
        if self._on_model_error is not None:
            self._on_model_error()
        self._fail(job, ModelFailed(f"model evaluation failed: {reason}"))

    def _advance_rows(self, lane: Lane, block: torch.Tensor) -> None:
        # Rows are independent: a pass larger than chunk_rows (in network rows) goes in pieces.
        chunk = max(1, self.chunk_rows // lane.evaluations)
        if block.shape[0] <= chunk:
            lane.advance(block)
            return
        for first in range(0, block.shape[0], chunk):
            lane.advance(block[first : first + chunk])

    def _slope(self, layout: Layout, divergence: Divergence | None, velocity: bool) -> Slope:
        field = self.model.field
        evaluate = field.evaluate
        c, w = layout.c, layout.w
        if velocity:  # state [x, v]: x stays, v = 0 + 1 * v(t, x)
            dim = self.model.dim

            def recording(t, y, block):
                x = y[:, :dim]
                v = evaluate(t, x) if c is None else evaluate(t, x, block[:, c], _scale(block, w))
                return torch.cat([torch.zeros_like(x), v], dim=1)

            return recording
        if divergence is None:
            if c is None:  # unconditional: the hot path, one call
                return lambda t, y, _block: evaluate(t, y)
            if w is None:
                return lambda t, y, block: evaluate(t, y, block[:, c])
            return lambda t, y, block: evaluate(t, y, block[:, c], block[:, w])
        dim = self.model.dim
        exact = divergence.method == "exact"
        columns = 1 if exact else divergence.probes
        probes = layout.probes

        def with_divergence(t, y, block):
            x = y[:, :dim].detach().requires_grad_(True)
            div = torch.zeros(x.shape[0], columns, device=x.device)
            condition = None if c is None else block[:, c]
            scale = None if w is None else block[:, w]
            # Op by op, without the executor's differentiable plans: with the process-wide
            # oneDNN fuser on, those fail to run (a TorchScript fault, not the model's).
            with torch.enable_grad(), torch.jit.optimized_execution(False):
                v = field.differentiable(t, x, condition, scale)
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
                    eps = block[:, probes].reshape(-1, columns, dim)
                    for p in range(columns):
                        grad = vjp(v, eps[:, p], p == columns - 1)
                        div[:, p] = (grad * eps[:, p]).sum(dim=1)
            return torch.cat([v.detach(), div], dim=1)

        return with_divergence

    def _at_event(self, unit: Unit) -> bool:
        """The unit has reached a step whose state is kept, or its last: record the state, and
        set its next event. True when it finished. (A pass only counts stages, `Unit.done`; this
        runs when the count reaches `Unit.next_event`.)"""
        job, lane = unit.job, unit.lane
        step = unit.done // lane.stages
        keep = unit.keep_index is not None and step in unit.keep_index
        done = step >= job.num_steps
        state = lane.state[unit.offset : unit.offset + unit.rows, lane.layout.x]
        first, last = unit.job_start, unit.job_start + unit.rows
        if keep:
            job.trajectory[unit.keep_index[step], first:last] = state[:, : self.model.dim]
        if not done:
            unit.next_event = _next_event(unit, job.num_steps)
            return False
        job.final[first:last] = state
        lane.remove(unit)
        self._units[job].remove(unit)
        job.units_left -= 1
        return True

    def _remove(self, job: Job) -> None:
        units = self._units.pop(job, None)
        if units:  # a finished job's units have left their lanes already
            for unit in units:
                unit.lane.remove(unit)
            for lane in self._lanes.values():
                lane.compact()
        if job in self._jobs:
            self._jobs.remove(job)

    def _finish(self, job: Job) -> None:
        self._remove(job)
        result = JobResult(
            final=job.final.cpu(),
            trajectory=job.trajectory.cpu() if job.trajectory is not None else None,
        )
        job.final = job.trajectory = None
        self.stats.jobs_done += 1
        self._resolve(job, result=result)

    def _fail(self, job: Job, error: ServiceError, reason: str | None = None) -> None:
        if reason is not None:
            # A job dropped before it was admitted has all its rows unfinished.
            units = self._units.get(job)
            unfinished = job.rows if units is None else sum(u.rows for u in units)
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
        if job.on_done is not None:
            job.on_done(result, error)
            return
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


def _next_event(unit: Unit, num_steps: int) -> int:
    """Stages done at the unit's next kept step after the current one, or at its last step."""
    step = unit.done // unit.lane.stages
    following = num_steps
    if unit.keep_index is not None:
        following = min((k for k in unit.keep_index if k > step), default=num_steps)
    return min(following, num_steps) * unit.lane.stages


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _device_fault(exc: BaseException) -> bool:
    """An error of the device rather than of the model's arithmetic: CUDA errors are sticky
    (every later call fails too), so the engine must be replaced, not the request failed."""
    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None and isinstance(exc, accelerator):
        return True
    return "CUDA error" in one_line(exc)


def _finite(states: torch.Tensor) -> bool:
    """No NaN or infinity in `states` (numpy's check on the CPU: a few microseconds, not 12)."""
    if states.device.type == "cpu":
        return bool(np.isfinite(states.numpy()).all())
    return bool(torch.isfinite(states).all())


def _scale(block: torch.Tensor, w: slice | None) -> torch.Tensor | None:
    """The guidance column of a lane block, or None for an unguided lane."""
    return None if w is None else block[:, w]
