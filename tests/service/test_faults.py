"""Faults that start inside the service: models that fail at some batch sizes, a dead or stuck
engine thread, deadlines and cancellations in the middle of shared integrations.

Every fault is injected deterministically: through a test model, a gate that holds the engine
thread at a chosen pass, or a clock the test moves; never by hoping for a timing."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import (
    PostFlow,
    free_port,
    service_command,
    serving,
    write_model_dir,
    write_module_dir,
)
from prometheus_client.parser import text_string_to_metric_families

from service.engine import Engine, EngineFailed, Job
from service.errors import Cancelled, DeadlineExceeded, ModelFailed, one_line
from service.field import Signature, VelocityField
from service.loader import LoadedModel, load_model, load_models
from service.metrics import Metrics
from service.mixture import GaussianMixture
from service.registry import Registry
from service.server import main
from service.settings import Settings
from service.solvers import integrate

CPU = torch.device("cpu")
WAIT_S = 30.0
SOURCE = {"means": [[0.0, 0.0]], "covs": [np.eye(2).tolist()], "weights": [1.0]}


# ------------------------------------------------------------------------ models that fail


@pytest.fixture(autouse=True)
def fuser_off_at_start():
    """The oneDNN fuser switch is process-wide, and a model loaded by an earlier test may have
    turned it on. The engines built by hand here run raw scripted modules that nothing checked
    under it (the loader checks every model it loads), so each test starts with it off and
    leaves it as it found it."""
    was_on = torch._C._jit_llga_enabled()
    torch.jit.enable_onednn_fusion(False)
    yield
    torch.jit.enable_onednn_fusion(was_on)


class FiveRowsOnly(torch.nn.Module):
    """Works on the 5-row probe only: reshape(5, 1) fails at any other batch size."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * t.reshape(5, 1)


class WrongAt257(torch.nn.Module):
    """Answers (B, 1) at 257 rows, the fast path's first probe."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 257:
            return x[:, :1]
        return -x + t


class FailsAt1024(torch.nn.Module):
    """Raises at 1,024 rows, the warm-up's size."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1024:
            raise RuntimeError("no kernel for 1024 rows")
        return -x + t


class NarrowAbove4100(torch.nn.Module):
    """Answers (B, 1) instead of (B, 2) above 4,100 rows: past the loader's largest probe
    (4,099 rows), so it loads, and fails only on passes that large."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4100:
            return x[:, :1] * t
        return -x + t


class InjectedDeviceFault(torch.nn.Module):
    """A CUDA-like error (sticky on a real device) when a row holds the marker 12345."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if bool((x == 12345.0).any()):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return -x + t


def test_a_model_that_fails_past_the_probe_is_refused_and_the_others_serve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_model_dir(tmp_path, "good", a=0.25)
    write_module_dir(tmp_path, "five-rows", FiveRowsOnly(), SOURCE, 2)
    write_module_dir(tmp_path, "fast-path", WrongAt257(), SOURCE, 2)
    write_module_dir(tmp_path, "warm-up", FailsAt1024(), SOURCE, 2)
    refused: dict[str, str] = {}
    with caplog.at_level(logging.ERROR, logger="flowserve.loader"):
        models = load_models(tmp_path, CPU, refused=refused, warmup_passes=1)
    assert list(models) == ["good"]
    assert refused == {
        "fast-path": "the fast path or warm-up failed: forward(t, x) returned (257, 1) for x of "
        "shape (257, 2)",
        "five-rows": "forward(t, x) failed on a probe input of 1 rows: shape '[5, 1]' is invalid "
        "for input of size 1",
        "warm-up": "the fast path or warm-up failed: no kernel for 1024 rows",
    }
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all(line.startswith("refused model ") for line in lines)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mixed-models")
    write_model_dir(root, "good", a=0.25)
    write_module_dir(root, "five-rows", FiveRowsOnly(), SOURCE, 2)
    return root


def test_a_refused_model_keeps_the_service_not_ready(mixed_dir: Path) -> None:
    with serving(mixed_dir, warmup_passes=0, serve_partial=True) as partial:
        ready = partial.get("/readyz")
        assert ready.status_code == 200
        reason = ready.json()["refused"]["five-rows"]
        assert reason.startswith("forward(t, x) failed on a probe input of 1 rows")
        models = partial.get("/models").json()
        assert [m["name"] for m in models["models"]] == ["good"]
        assert models["refused"] == [{"name": "five-rows", "reason": reason}]
        assert partial.post("/sample", json={"model": "good", "num_samples": 2}).status_code == 200
        missing = partial.post("/sample", json={"model": "five-rows", "num_samples": 2})
        assert missing.status_code == 404
        assert missing.json()["detail"] == (
            f"model: unknown model 'five-rows'; loaded: good; refused: five-rows: {reason}"
        )
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(Settings(models_dir=mixed_dir, device="cpu", warmup_passes=0))
    with TestClient(app) as strict:
        deadline = time.monotonic() + WAIT_S
        while not app.state.registry.ready:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        answer = strict.get("/readyz")
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["detail"] == (
            f"not ready: model five-rows was refused: {reason}; fix the folder, or set "
            "FLOW_SERVE_PARTIAL=true to serve the others"
        )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "absent", "does not exist"),
        (lambda p: p, "holds no model folder"),
    ],
)
def test_a_missing_or_empty_models_dir_fails_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make, message: str
) -> None:
    (tmp_path / ".half-written").mkdir()  # an atomic writer's folder is not a model
    folder = make(tmp_path)
    assert main(["--models-dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"flowserve: error: models dir {folder} {message} (FLOW_MODELS_DIR, --models-dir)\n"
    )


# ------------------------------------------------------------------------ the engine, gated


class Gate:
    """The field as the engine sees it: counts calls, holds call `hold_at` until released,
    raises `kill` (a BaseException: nothing in the engine catches it as a model error) at call
    `kill_at`."""

    def __init__(self, module) -> None:
        self.module = module
        self.calls = 0
        self.hold_at: int | None = None
        self.kill_at: int | None = None
        self.reached = threading.Event()
        self.released = threading.Event()

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt("injected: the engine thread is killed")
        if self.calls == self.hold_at:
            self.reached.set()
            self.released.wait(WAIT_S)
        return self.module(t, x)

    async def hold(self, at: int) -> None:
        self.hold_at = at
        assert await asyncio.to_thread(self.reached.wait, WAIT_S), "engine never got there"


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gated_engine(module, clock: Clock | None = None, **sizes: int) -> tuple[Engine, Gate]:
    gate = Gate(module)
    source = GaussianMixture.from_spec(SOURCE)
    model = LoadedModel("m", 2, source, {}, VelocityField(Signature(2, (2,)), gate), CPU)
    options = {"max_batch_rows": 16_384, "block_rows": 2048, "max_queue_rows": 100_000, **sizes}
    engine = Engine(model, clock=clock or time.monotonic, **options)
    engine.start()
    return engine, gate


def start(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, 2, generator=torch.Generator().manual_seed(seed))


def solo(module, rows: int, seed: int, num_steps: int) -> torch.Tensor:
    with torch.no_grad():
        return integrate(module, start(rows, seed), num_steps)


@pytest.fixture
def post() -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    return torch.jit.script(PostFlow(2, hidden=16, layers=2).eval())


async def test_a_wrong_shape_at_one_batch_size_fails_that_request_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    module = torch.jit.script(NarrowAbove4100())
    engine, gate = gated_engine(module)
    try:
        first = asyncio.ensure_future(engine.run(Job(z0=start(1, 0), solver="euler", num_steps=6)))
        await gate.hold(at=1)
        # Both join pass 2 with the first: 5,008 rows, which the model answers wrongly.
        large = asyncio.ensure_future(
            engine.run(Job(z0=start(5000, 1), solver="euler", num_steps=4))
        )
        small = asyncio.ensure_future(engine.run(Job(z0=start(7, 2), solver="euler", num_steps=4)))
        await asyncio.sleep(0)
        gate.released.set()
        with caplog.at_level(logging.ERROR, logger="flowserve.engine"):
            with pytest.raises(ModelFailed) as info:
                await large
            results = [await first, await small]
    finally:
        engine.stop(timeout=WAIT_S)
    message = "forward(t, x) returned (5000, 1) for x of shape (5000, 2)"
    assert str(info.value) == f"model evaluation failed: {message}"
    # The others shared the failing pass, were advanced again alone, and went on.
    torch.testing.assert_close(results[0].final, solo(module, 1, 0, 6), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[1].final, solo(module, 7, 2, 4), rtol=1e-6, atol=1e-6)
    assert engine.stats.model_errors == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"model m failed on the 5000 rows of one request: {message}"
    ]


async def test_a_pass_that_fails_only_for_its_size_fails_no_request() -> None:
    module = torch.jit.script(NarrowAbove4100())
    engine, gate = gated_engine(module)
    try:
        first = asyncio.ensure_future(engine.run(Job(z0=start(1, 0), solver="rk4", num_steps=3)))
        await gate.hold(at=1)
        tasks = [
            asyncio.ensure_future(engine.run(Job(z0=start(rows, seed), solver="rk4", num_steps=3)))
            for rows, seed in ((4000, 1), (200, 2))
        ]
        await asyncio.sleep(0)
        gate.released.set()
        results = [await first] + [await task for task in tasks]
    finally:
        engine.stop(timeout=WAIT_S)
    for result, (rows, seed) in zip(results, ((1, 0), (4000, 1), (200, 2)), strict=True):
        with torch.no_grad():
            expected = integrate(module, start(rows, seed), 3, "rk4")
        torch.testing.assert_close(result.final, expected, rtol=1e-6, atol=1e-6)
    assert engine.stats.model_errors == 0


async def test_a_deadline_passing_mid_integration_drops_that_job_only(post) -> None:
    clock = Clock()
    engine, gate = gated_engine(post, clock, max_batch_rows=64, block_rows=16)
    try:
        jobs = [Job(z0=start(20, seed), solver="euler", num_steps=30) for seed in range(3)]
        jobs[1].deadline = clock.now + 10
        tasks = [asyncio.ensure_future(engine.run(job)) for job in jobs]
        await gate.hold(at=5)
        clock.now += 20  # the deadline passes while pass 5 runs
        gate.released.set()
        with pytest.raises(DeadlineExceeded):
            await tasks[1]
        first, third = await tasks[0], await tasks[2]
    finally:
        engine.stop(timeout=WAIT_S)
    assert engine.stats.rows_dropped == {"deadline": 20}
    torch.testing.assert_close(first.final, solo(post, 20, 0, 30), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(third.final, solo(post, 20, 2, 30), rtol=1e-5, atol=1e-5)


async def test_cancelling_one_job_of_a_shared_pass_leaves_the_others(post) -> None:
    engine, gate = gated_engine(post, max_batch_rows=64, block_rows=16)
    try:
        jobs = [Job(z0=start(12, seed), solver="rk4", num_steps=6) for seed in range(3)]
        tasks = [asyncio.ensure_future(engine.run(job)) for job in jobs]
        await gate.hold(at=3)
        jobs[0].cancel()
        gate.released.set()
        with pytest.raises(Cancelled):
            await tasks[0]
        others = [await tasks[1], await tasks[2]]
    finally:
        engine.stop(timeout=WAIT_S)
    assert engine.stats.rows_dropped == {"cancelled": 12}
    for result, seed in zip(others, (1, 2), strict=True):
        with torch.no_grad():
            expected = integrate(post, start(12, seed), 6, "rk4")
        torch.testing.assert_close(result.final, expected, rtol=1e-5, atol=1e-5)


async def test_a_killed_engine_thread_fails_its_waiting_jobs_at_once(post) -> None:
    engine, gate = gated_engine(post, max_batch_rows=64, block_rows=16)
    gate.kill_at = 4
    jobs = [Job(z0=start(10, seed), solver="euler", num_steps=50) for seed in range(3)]
    results = await asyncio.gather(*(engine.run(job) for job in jobs), return_exceptions=True)
    assert all(isinstance(r, EngineFailed) for r in results), results
    assert str(results[0]) == (
        "model m: its engine failed (KeyboardInterrupt: injected: the engine thread is killed); "
        "it is being restarted, retry"
    )
    assert engine.health(stall_s=60) == "KeyboardInterrupt: injected: the engine thread is killed"
    with pytest.raises(EngineFailed):
        engine.reserve(1)


async def test_a_stuck_engine_is_reported_and_no_request_waits_past_its_deadline(post) -> None:
    clock = Clock()
    engine, gate = gated_engine(post, clock)
    try:
        job = Job(z0=start(4, 0), solver="euler", num_steps=10)
        task = asyncio.ensure_future(engine.run(job))
        await gate.hold(at=2)  # stuck in a pass from now on
        assert engine.health(stall_s=60) is None
        clock.now += 61
        assert engine.health(stall_s=60) == "no pass finished for 61 s while 1 requests waited"
        # A request with a deadline returns at it although the engine never answers.
        late = Job(z0=start(2, 1), solver="euler", num_steps=1)
        late.deadline = clock.now + 0.2
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(engine.run(late), timeout=WAIT_S)
        engine.abandon("stuck")
        with pytest.raises(EngineFailed):
            await task
    finally:
        gate.released.set()
        engine.stop(timeout=WAIT_S)


# ------------------------------------------------------------------------ the watchdog


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    write_model_dir(tmp_path, "tiny")
    return tmp_path


def test_the_watchdog_replaces_a_dead_engine_and_the_service_serves_again(
    tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(tiny_dir, watchdog_interval_s=0.02) as client:
        registry = client.app.state.registry
        dying = registry.served["tiny"].engine

        def killed() -> None:
            raise KeyboardInterrupt("injected")

        dying._pass = killed  # the next pass kills the engine thread
        with caplog.at_level(logging.ERROR, logger="flowserve"):
            answer = client.post("/sample", json={"num_samples": 3, "num_steps": 5})
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "1"
            assert answer.json()["detail"].startswith(
                "model tiny: its engine failed (KeyboardInterrupt: injected)"
            )
            deadline = time.monotonic() + WAIT_S
            while (
                registry.served["tiny"].engine is dying or client.get("/readyz").status_code != 200
            ):
                assert time.monotonic() < deadline, "not replaced"
                time.sleep(0.02)
        again = client.post("/sample", json={"x0": [[1.0, 2.0]], "num_steps": 4})
        assert again.status_code == 200
        np.testing.assert_allclose(
            again.json()["samples"], [[1.0 * 1.125**4, 2.0 * 1.125**4]], rtol=1e-5
        )
        text = client.get("/metrics").text
    assert metric(text, "flowserve_engine_faults_total", model="tiny", kind="died") == 1
    assert metric(text, "flowserve_engine_restarts_total", model="tiny") == 1
    logged = [r.getMessage() for r in caplog.records]
    assert "engine of model tiny died: KeyboardInterrupt: injected" in logged
    assert any(line.startswith("engine of model tiny died (KeyboardInterrupt") for line in logged)


async def test_readiness_names_a_recovering_model_until_its_new_engine_answers(
    tiny_dir: Path,
) -> None:
    registry = Registry(Settings(models_dir=tiny_dir, device="cpu", warmup_passes=0), Metrics())
    await asyncio.to_thread(registry.load)
    try:
        served = registry.served["tiny"]
        registry._replace("tiny", served, "stuck for a test")
        assert registry.not_ready() == "not ready: model tiny is recovering: stuck for a test"
        await registry.check_engines()  # probes the new engine
        assert registry.not_ready() is None
    finally:
        registry.close()


async def test_an_engine_that_keeps_failing_makes_the_service_give_up(tiny_dir: Path) -> None:
    calls: list[str] = []
    settings = Settings(models_dir=tiny_dir, device="cpu", warmup_passes=0, engine_max_restarts=1)
    registry = Registry(settings, Metrics(), on_fatal=calls.append)
    await asyncio.to_thread(registry.load)
    try:
        served = registry.served["tiny"]
        registry._replace("tiny", served, "first")
        registry._replace("tiny", served, "second")
        assert registry.fatal == (
            "the engine of model tiny failed 2 times within 300 s (FLOW_ENGINE_MAX_RESTARTS, "
            "FLOW_ENGINE_RESTART_WINDOW_S); last: second"
        )
        assert calls == [registry.fatal]
        assert registry.not_ready() == f"not ready: {registry.fatal}"
    finally:
        registry.close()


@pytest.mark.e2e
def test_a_device_fault_in_a_real_server_ends_in_503s_and_exit_code_1(tmp_path: Path) -> None:
    write_module_dir(tmp_path, "faulty", InjectedDeviceFault(), SOURCE, 2)
    port = free_port()
    log = tmp_path / "server.log"
    env = {
        "FLOW_DEVICE": "cpu",
        "FLOW_ENGINE_MAX_RESTARTS": "0",
        "FLOW_WATCHDOG_INTERVAL_S": "0.05",
        "FLOW_WARMUP_PASSES": "0",
        "PYTHONUNBUFFERED": "1",
        "PATH": "/usr/bin:/bin",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            service_command(tmp_path, port), env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        fine = httpx.post(f"{url}/sample", json={"x0": [[1.0, 2.0]], "num_steps": 2}, timeout=30)
        assert fine.status_code == 200
        fault = httpx.post(
            f"{url}/sample", json={"x0": [[12345.0, 0.0]], "num_steps": 2}, timeout=30
        )
        assert fault.status_code == 503, fault.text
        assert json.loads(fault.text)["detail"].startswith("model faulty: its engine failed")
        assert process.wait(timeout=60) == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "engine of model faulty died: Error: CUDA error: an illegal memory access" in text
    assert "the service stops serving" in text


# ------------------------------------------------------------------------ CUDA without a GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_asking_for_cuda_without_a_device_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_model_dir(tmp_path, "tiny")
    assert main(["--models-dir", str(tmp_path), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == (
        "flowserve: error: device: cuda was asked for but no CUDA device is available\n"
    )
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "source": {"std": 1.0},
                "target": {"means": [[1.0, 1.0]], "covs": [np.eye(2).tolist()], "weights": [1.0]},
                "model": {"hidden": 8, "layers": 1},
                "train": {"batch_size": 8, "steps": 1, "lr": 0.01, "seed": 0},
            }
        )
    )
    trained = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.train",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cuda",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert trained.returncode == 2
    assert trained.stderr == "error: --device: cuda was asked for but no CUDA device is available\n"
    assert not (tmp_path / "out").exists()


def test_the_one_line_of_a_torchscript_error_is_its_own(tmp_path: Path) -> None:
    folder = write_module_dir(tmp_path, "faulty", InjectedDeviceFault(), SOURCE, 2)
    model = load_model(folder, CPU, rewrites=())
    with pytest.raises(torch.jit.Error) as info:
        model.field(torch.zeros(1, 1), torch.full((1, 2), 12345.0))
    assert one_line(info.value) == (
        "CUDA error: an illegal memory access was encountered (injected)"
    )
