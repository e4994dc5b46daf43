"""service.engine driven directly: batched answers equal solo ones, fairness, cancellation,
deadlines, the bounded queue. A gate around the field holds the engine thread at a chosen pass,
so "while a job runs" is an ordering the test sets up, never a race it hopes to win."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from conftest import PostFlow

from service.engine import (
    Cancelled,
    DeadlineExceeded,
    Divergence,
    Engine,
    EngineStopped,
    Job,
    ModelFailed,
    QueueFull,
)
from service.field import Signature, VelocityField
from service.lanes import Lane, Layout, Unit
from service.loader import LoadedModel
from service.mixture import GaussianMixture
from service.solvers import get_solver, integrate, kept_steps

DIM = 2
WAIT_S = 30.0


class Gate:
    """The field as the engine sees it: counts calls, can hold call `hold_at` until released,
    and can fail the calls in `fail_at`."""

    def __init__(self, module: torch.jit.ScriptModule):
        self.module = module
        self.calls = 0
        self.hold_at: int | None = None
        self.fail_at: set[int] = set()
        self.reached = threading.Event()
        self.released = threading.Event()

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls in self.fail_at:
            raise RuntimeError("field exploded\nsecond line")
        if self.calls == self.hold_at:
            self.reached.set()
            self.released.wait(WAIT_S)
        return self.module(t, x)

    async def hold(self, at: int) -> None:
        """Wait until the engine thread is inside call `at` (and held there)."""
        self.hold_at = at
        assert await asyncio.to_thread(self.reached.wait, WAIT_S), "engine never got there"

    def release(self) -> None:
        self.released.set()


def loaded_model(module, autograd_module, *, small=None, small_rows: int = 0) -> LoadedModel:
    """A model as the loader would hand it over: `module` for plain passes (`small` for those
    under `small_rows` rows), `autograd_module` for passes that take the divergence; source
    N(0, I)."""
    source = GaussianMixture.from_spec(
        {"means": [[0.0] * DIM], "covs": [torch.eye(DIM).tolist()], "weights": [1.0]}
    )
    field = VelocityField(
        Signature(DIM, (DIM,)),
        module,
        autograd=autograd_module,
        small=small,
        small_rows=small_rows,
    )
    return LoadedModel(
        name="m",
        dim=DIM,
        source=source,
        manifest={},
        field=field,
        device=torch.device("cpu"),
    )


@pytest.fixture(scope="module")
def field() -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    return torch.jit.script(PostFlow(DIM, hidden=16, layers=2).eval())


@dataclass
class Setup:
    engine: Engine
    gate: Gate


@pytest.fixture
def make_engine(field: torch.jit.ScriptModule) -> Iterator:
    engines: list[Engine] = []
    gates: list[Gate] = []

    def make(
        max_batch_rows: int = 64,
        block_rows: int = 16,
        max_queue_rows: int = 10_000,
        chunk_rows: int | None = None,
        on_pass: Callable[[int], None] | None = None,
        on_drop: Callable[[str, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        gate = Gate(field)
        engine = Engine(
            loaded_model(gate, field),
            max_batch_rows=max_batch_rows,
            block_rows=block_rows,
            max_queue_rows=max_queue_rows,
            chunk_rows=chunk_rows,
            on_pass=on_pass,
            on_drop=on_drop,
            clock=clock,
        )
        engine.start()
        engines.append(engine)
        gates.append(gate)
        return Setup(engine, gate)

    yield make
    for gate in gates:
        gate.release()
    for engine in engines:
        engine.stop(timeout=WAIT_S)


def points(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, DIM, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Spec:
    rows: int
    num_steps: int
    solver: str = "euler"
    stride: int | None = None
    backward: bool = False

    def job(self, seed: int) -> Job:
        keep = kept_steps(self.num_steps, self.stride) if self.stride else None
        t0, t1 = (1.0, 0.0) if self.backward else (0.0, 1.0)
        return Job(
            z0=points(self.rows, seed),
            solver=self.solver,
            num_steps=self.num_steps,
            t0=t0,
            t1=t1,
            keep=keep,
        )

    def solo(self, field: torch.jit.ScriptModule, seed: int) -> torch.Tensor:
        t0, t1 = (1.0, 0.0) if self.backward else (0.0, 1.0)
        with torch.inference_mode():
            return integrate(
                field,
                points(self.rows, seed),
                self.num_steps,
                self.solver,
                t0=t0,
                t1=t1,
                stride=self.stride,
            )


FIRST_WAVE = [
    Spec(40, 12),
    Spec(5, 3, stride=1),
    Spec(33, 7, "rk4", stride=3),
    Spec(16, 9, "heun", backward=True),
]
LATE_WAVE = [
    Spec(3, 5, "midpoint"),
    Spec(21, 4, stride=2),
    Spec(1, 1),
    Spec(17, 6, "rk4"),
    Spec(8, 10, "euler", backward=True),
]


def check(spec: Spec, result, field: torch.jit.ScriptModule, seed: int) -> None:
    expected = spec.solo(field, seed)
    if spec.stride:
        assert result.trajectory.shape == (
            len(kept_steps(spec.num_steps, spec.stride)),
            spec.rows,
            DIM,
        )
        torch.testing.assert_close(result.trajectory, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.final, expected[-1], rtol=1e-5, atol=1e-5)
    else:
        assert result.trajectory is None
        torch.testing.assert_close(result.final, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("max_batch_rows", "block_rows", "chunk_rows"), [(64, 16, None), (1024, 1024, 7), (8, 8, None)]
)
async def test_batched_equals_solo_with_jobs_joining_mid_flight(
    make_engine, field, max_batch_rows: int, block_rows: int, chunk_rows: int | None
) -> None:
    setup = make_engine(max_batch_rows=max_batch_rows, block_rows=block_rows, chunk_rows=chunk_rows)
    engine, gate = setup.engine, setup.gate
    first = [asyncio.ensure_future(engine.run(s.job(i))) for i, s in enumerate(FIRST_WAVE)]
    await gate.hold(at=5)
    late = [asyncio.ensure_future(engine.run(s.job(100 + i))) for i, s in enumerate(LATE_WAVE)]
    await asyncio.sleep(0)  # the late jobs are queued before the held pass ends
    assert engine.queued_jobs == len(FIRST_WAVE) + len(LATE_WAVE)
    gate.release()
    results = await asyncio.gather(*first, *late)
    seeds = list(range(len(FIRST_WAVE))) + [100 + i for i in range(len(LATE_WAVE))]
    for spec, result, seed in zip(FIRST_WAVE + LATE_WAVE, results, seeds, strict=True):
        check(spec, result, field, seed)
    stats = engine.stats
    assert stats.max_jobs_in_pass > 1
    assert stats.max_rows_in_pass <= max_batch_rows
    assert stats.jobs_done == len(results)
    assert (stats.jobs_failed, stats.rows_dropped) == (0, {})
    assert engine.queued_jobs == 0


@pytest.mark.parametrize(("rows", "fused_calls"), [(9, 0), (10, 5), (32, 5)])
async def test_passes_under_fused_min_rows_run_the_unfused_graph(
    field, rows: int, fused_calls: int
) -> None:
    fused, unfused = Gate(field), Gate(field)
    model = loaded_model(fused, field, small=unfused, small_rows=10)
    engine = Engine(model, max_batch_rows=64, block_rows=64, max_queue_rows=1000)
    engine.start()
    try:
        spec = Spec(rows, 5)
        result = await engine.run(spec.job(0))
    finally:
        engine.stop(timeout=WAIT_S)
    assert (fused.calls, unfused.calls) == (fused_calls, 5 - fused_calls)
    check(spec, result, field, 0)


async def test_a_small_job_is_not_stuck_behind_a_large_one(make_engine, field) -> None:
    # Jobs still in the engine as each pass ends, seen on the engine thread: the event loop
    # may wake long after a job is done, while the engine runs on.
    in_engine: list[int] = []
    setup = make_engine(
        max_batch_rows=8, block_rows=8, on_pass=lambda _rows: in_engine.append(engine.queued_jobs)
    )
    engine, gate = setup.engine, setup.gate
    large, small = Spec(64, 20), Spec(4, 3)
    large_task = asyncio.ensure_future(engine.run(large.job(0)))
    await gate.hold(at=2)
    small_task = asyncio.ensure_future(engine.run(small.job(1)))
    await asyncio.sleep(0)
    gate.release()
    small_result, large_result = await asyncio.gather(small_task, large_task)
    # in_engine[i] is seen in pass i + 1, before that pass settles its jobs: the small job,
    # queued while pass 2 was held, was settled in pass i where i is the first index past 1
    # that counts only the large job. Alone, the large job needs 8 units x 20 steps = 160
    # passes of 8 rows; the small one was answered after a handful of them.
    assert in_engine[:2] == [1, 2]
    small_done_at = in_engine.index(1, 2)
    assert small_done_at <= 2 + 2 * small.num_steps + 1
    assert in_engine[small_done_at:-1] == [1] * (len(in_engine) - small_done_at - 1)
    assert engine.stats.passes >= 160
    check(small, small_result, field, 1)
    check(large, large_result, field, 0)


async def test_a_cancelled_job_leaves_at_the_next_pass(make_engine) -> None:
    setup = make_engine(max_batch_rows=64, block_rows=16)
    engine, gate = setup.engine, setup.gate
    job = Spec(50, 100).job(0)
    task = asyncio.ensure_future(engine.run(job))
    await gate.hold(at=2)
    job.cancel()
    gate.release()
    with pytest.raises(Cancelled, match=r"^cancelled$"):
        await task
    stats = engine.stats
    assert stats.passes == 2
    assert stats.rows_dropped == {"cancelled": 50}
    assert (stats.jobs_done, stats.jobs_failed) == (0, 1)
    assert engine.queued_jobs == 0


async def test_a_caller_that_goes_away_drops_its_rows_as_a_disconnect(make_engine) -> None:
    setup = make_engine()
    engine, gate = setup.engine, setup.gate
    task = asyncio.ensure_future(engine.run(Spec(20, 100).job(0)))
    await gate.hold(at=3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.release()
    other = await engine.run(Spec(2, 2).job(1))  # served after the drop
    assert other.final.shape == (2, DIM)
    assert engine.stats.rows_dropped == {"disconnect": 20}
    assert engine.stats.passes == 3 + 2


async def test_a_past_deadline_job_gets_deadline_exceeded(make_engine) -> None:
    dropped = threading.Event()
    engine = make_engine(on_drop=lambda reason, rows: dropped.set()).engine
    job = Spec(10, 5).job(0)
    job.deadline = time.monotonic() - 1.0
    with pytest.raises(DeadlineExceeded, match=r"^deadline passed$"):
        await engine.run(job)
    assert await asyncio.to_thread(dropped.wait, WAIT_S)
    assert engine.stats.rows_dropped == {"deadline": 10}
    assert engine.stats.passes == 0


async def test_a_failing_field_fails_its_jobs_and_the_engine_goes_on(make_engine, field) -> None:
    setup = make_engine()
    engine, gate = setup.engine, setup.gate
    gate.fail_at = {2, 3}  # the pass, then the job's rows alone
    with pytest.raises(ModelFailed, match=r"^model evaluation failed: field exploded$"):
        await engine.run(Spec(4, 5).job(0))
    result = await engine.run(Spec(4, 5).job(1))
    check(Spec(4, 5), result, field, 1)
    assert (engine.stats.jobs_failed, engine.stats.jobs_done) == (1, 1)


def test_reserve_bounds_the_queue_in_rows(make_engine) -> None:
    engine = make_engine(max_queue_rows=100).engine
    release = engine.reserve(60)
    with pytest.raises(QueueFull) as info:
        engine.reserve(41)
    assert str(info.value) == (
        "queue full: 60 rows admitted, this request adds 41, the limit is 100 "
        "(FLOW_MAX_QUEUE_ROWS); retry later"
    )
    release_more = engine.reserve(40)
    assert engine.queued_rows == 100
    release()
    release()  # idempotent
    assert engine.queued_rows == 40
    release_more()
    assert engine.queued_rows == 0


async def test_a_stopped_engine_refuses_work(make_engine) -> None:
    engine = make_engine().engine
    engine.stop(timeout=WAIT_S)
    with pytest.raises(EngineStopped, match=r"^the service is shutting down$"):
        engine.reserve(1)
    with pytest.raises(EngineStopped):
        await engine.run(Spec(1, 1).job(0))


def test_block_rows_may_not_exceed_the_batch(field) -> None:
    model = loaded_model(field, field)
    with pytest.raises(
        ValueError, match=r"^block_rows \(9\) must not exceed max_batch_rows \(8\)$"
    ):
        Engine(model, max_batch_rows=8, block_rows=9, max_queue_rows=10)


def engine_for(module, autograd_module) -> Engine:
    engine = Engine(
        loaded_model(module, autograd_module),
        max_batch_rows=64,
        block_rows=16,
        max_queue_rows=10_000,
    )
    engine.start()
    return engine


def likelihood_job(rows: int, num_steps: int, solver: str = "euler") -> Job:
    z0 = torch.zeros(rows, DIM + 1)
    z0[:, :DIM] = points(rows, 3)
    return Job(
        z0=z0, solver=solver, num_steps=num_steps, t0=1.0, t1=0.0, divergence=Divergence("exact")
    )


async def test_a_failing_lane_fails_only_its_own_jobs(field) -> None:
    broken = Gate(field)
    broken.fail_at = {1, 2}
    engine = engine_for(field, broken)
    try:
        plain = asyncio.ensure_future(engine.run(Spec(4, 6).job(0)))
        with pytest.raises(ModelFailed, match="field exploded"):
            await engine.run(likelihood_job(4, 6))
        check(Spec(4, 6), await plain, field, 0)
    finally:
        engine.stop(timeout=WAIT_S)


class Drift(torch.nn.Module):
    """v(t, x) = b t: no dependence on x, so div v = 0 and x0 = x1 - b / 2."""

    def __init__(self) -> None:
        super().__init__()
        self.b = torch.nn.Parameter(torch.tensor([1.0, -2.0]))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.b * t


class Constant(torch.nn.Module):
    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x)


@pytest.mark.parametrize(("module", "shift"), [(Drift(), [0.5, -1.0]), (Constant(), [1.0, 1.0])])
async def test_fields_that_ignore_x_have_zero_divergence(module, shift) -> None:
    scripted = torch.jit.script(module)
    engine = engine_for(scripted, scripted)
    try:
        job = likelihood_job(5, 4, solver="rk4")
        x1 = job.z0[:, :DIM].clone()
        result = await engine.run(job)
    finally:
        engine.stop(timeout=WAIT_S)
    torch.testing.assert_close(result.final[:, :DIM], x1 - torch.tensor(shift))
    assert torch.equal(result.final[:, DIM], torch.zeros(5))


@pytest.mark.parametrize("sizes", [[3, 16, 1, 7, 16, 2, 5, 9], [4] * 8], ids=["mixed", "equal"])
@pytest.mark.parametrize(
    "dead",
    [(0,), (3,), (7,), (2, 3), (1, 4, 6), (0, 2, 4, 6), (1, 2, 3, 4, 5, 6), tuple(range(8))],
    ids=lambda dead: "dead-" + "-".join(map(str, dead)),
)
def test_units_that_leave_take_their_rows_and_no_other(sizes: list[int], dead: tuple) -> None:
    # Mixed sizes leave holes that compaction closes (runs that move by less than their length,
    # and by more; many holes take the gathering path); equal sizes have the lane's last unit
    # move into the place of the one that left.
    layout = Layout.build(DIM, 1)
    lane = Lane(get_solver("euler"), layout, torch.device("cpu"), lambda t, y, b: y)
    units, blocks = [], []
    for i, rows in enumerate(sizes):
        unit = Unit(job=None, lane=lane, job_start=0, rows=rows)  # type: ignore[arg-type]
        z = torch.arange(rows * DIM, dtype=torch.float32).reshape(rows, DIM) + 1000 * i
        lane.append(unit, z, 0.0, 0.1)
        units.append(unit)
        blocks.append(lane.state[unit.offset : unit.offset + rows].clone())
    for i in dead:
        lane.remove(units[i])
    lane.compact()
    alive = [units[i] for i in range(len(sizes)) if i not in dead]
    assert sorted(lane.units, key=id) == sorted(alive, key=id)
    assert lane.rows == sum(unit.rows for unit in alive)
    at = 0
    for unit in lane.units:  # in the order of their rows, which tile the lane
        assert unit.offset == at
        at += unit.rows
        assert torch.equal(
            lane.state[unit.offset : unit.offset + unit.rows], blocks[units.index(unit)]
        )
    assert at == lane.rows == lane.full().shape[0]
    if sizes[0] == sizes[-1] and dead == (3,):  # the last unit moved into the place of unit 3
        assert units[-1].offset == 3 * sizes[0] and lane.units[3] is units[-1]
