"""The engine in a process of its own (FLOW_ENGINE=process): real
server processes, several HTTP fronts, and the engine process killed under load.

The API suite itself runs against both kinds of engine (the `ENGINES` parametrisation of
test_routes, test_conditional and test_likelihood); these are the properties of the split."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import (
    REPO_ROOT,
    free_port,
    service_command,
    wait_ready,
    write_model_dir,
    write_module_dir,
)
from prometheus_client.parser import text_string_to_metric_families

from service import ipc
from service.engine import Divergence, Draw, Job, JobResult
from service.errors import QueueFull

A = 0.5
LONG = {"model": "tiny", "num_samples": 8, "num_steps": 3000}


def metric_samples(text: str, name: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def child_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOW_", "PROMETHEUS"))}
    return {
        **env,
        "PYTHONUNBUFFERED": "1",
        "FLOW_DEVICE": "cpu",
        "FLOW_LOG_LEVEL": "info",
        "FLOW_WARMUP_PASSES": "0",
        "FLOW_ENGINE": "process",
        **settings,
    }


@contextlib.contextmanager
def server(models_dir: Path, tmp_path: Path, **settings: str):
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            service_command(models_dir, port),
            cwd=REPO_ROOT,
            env=child_env(**settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log, timeout=120)
        yield url, process, log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_model_dir(root, "tiny", a=A)
    return root


def engine_pid(url: str) -> int:
    """The engine process, as /readyz names it."""
    return int(httpx.get(f"{url}/readyz").headers["X-Flow-Engine-Pid"])


class HangsOnMarker(torch.nn.Module):
    """v = -x + t, except that a pass whose first row is (777, n) counts to n million first:
    with n in the thousands, a pass that does not return (for minutes)."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if bool(x[0, 0] == 777.0):
            n = int(x[0, 1]) * 1_000_000
            i = 0
            while i < n:
                i += 1
            return -x + t + 0.0 * float(i)
        return -x + t


def euler_of_hangs(x0: list[list[float]], num_steps: int) -> np.ndarray:
    x = np.asarray(x0, dtype=np.float64)
    h = 1.0 / num_steps
    for k in range(num_steps):
        x = x + h * (-x + k * h)
    return x


@pytest.mark.e2e
def test_a_pass_that_never_returns_is_given_up_and_the_engine_process_serves_on(
    tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    source = {"means": [[0.0, 0.0]], "covs": [[[1.0, 0.0], [0.0, 1.0]]], "weights": [1.0]}
    write_module_dir(root, "hangs", HangsOnMarker(), source, dim=2)
    settings = {"FLOW_ENGINE_STALL_S": "1", "FLOW_WATCHDOG_INTERVAL_S": "0.1"}
    with server(root, tmp_path, **settings) as (url, process, log):
        pid = engine_pid(url)
        started = time.monotonic()
        stuck = httpx.post(
            f"{url}/sample", json={"x0": [[777.0, 4000.0]], "num_steps": 2}, timeout=60
        )
        waited = time.monotonic() - started
        # The watchdog gave the stuck pass up: its request has its 503 (sent by the control
        # socket: the driver that would send it is the one stuck).
        assert stuck.status_code == 503, stuck.text
        assert stuck.headers["retry-after"] == "1"
        assert stuck.json()["detail"].startswith("model hangs: its engine failed (no pass ")
        assert waited < 10, waited
        # A new driver serves the replacement: the same engine process answers, exactly.
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, httpx.get(f"{url}/readyz").text
            time.sleep(0.05)
        x0 = [[1.0, 2.0], [-0.5, 0.25]]
        again = httpx.post(f"{url}/sample", json={"x0": x0, "num_steps": 8}, timeout=60)
        assert again.status_code == 200, again.text
        np.testing.assert_allclose(again.json()["samples"], euler_of_hangs(x0, 8), rtol=1e-5)
        assert engine_pid(url) == pid
        assert process.poll() is None
        text = log.read_text()
    assert "engine process: the driver is stuck in a pass; a new driver takes over" in text
    assert "engine of model hangs stalled" in text


@pytest.mark.e2e
def test_requests_of_two_fronts_share_the_engines_passes(tiny_dir: Path, tmp_path: Path) -> None:
    # Each request runs for a second or more, so the last comes while the first still runs.
    steps = 30_000
    settings = {"FLOW_HTTP_WORKERS": "2", "FLOW_MAX_STEPS": str(steps)}
    with server(tiny_dir, tmp_path, **settings) as (url, _, _):

        async def storm() -> list[httpx.Response]:
            # One connection per request, a few ms apart: a burst of connects at once is taken
            # whole by whichever front wakes first; spaced, they spread over both fronts.
            async def one(seed: int) -> httpx.Response:
                await asyncio.sleep(0.02 * seed)
                async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                    body = {**LONG, "num_steps": steps, "seed": seed}
                    return await client.post("/sample", json=body)

            return await asyncio.gather(*(one(seed) for seed in range(24)))

        answers = asyncio.run(storm())
        text = httpx.get(f"{url}/metrics").text
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers][:2]
    fronts = Counter(a.headers["x-flow-front"] for a in answers)
    assert len(fronts) == 2, fronts  # both fronts answered
    # The engine's own count: passes that held more requests than either front sent, so their
    # rows came from both fronts.
    buckets = metric_samples(text, "flowserve_forward_pass_requests_bucket")
    beyond_either = max(fronts.values())
    passes = {float(dict(k)["le"]): v for k, v in buckets.items() if dict(k)["model"] == "tiny"}
    at_most = max(le for le in passes if le <= beyond_either)
    assert passes[float("inf")] - passes[at_most] > 0, (fronts, passes)
    # Counters are summed over the processes: one answer, every request counted once.
    requests = metric_samples(text, "flowserve_requests_total")
    assert requests[(("endpoint", "/sample"), ("status", "200"))] == 24
    for answer, seed in zip(answers, range(24), strict=True):
        assert answer.json()["seed"] == seed


@pytest.mark.e2e
def test_a_killed_engine_process_gives_503s_at_once_and_the_service_exits_1(
    tiny_dir: Path, tmp_path: Path
) -> None:
    roomy = {"FLOW_MAX_STEPS": "10000000", "FLOW_MAX_ROW_STEPS": "1000000000"}
    with server(tiny_dir, tmp_path, FLOW_HTTP_WORKERS="2", **roomy) as (url, process, log):
        body = {**LONG, "num_steps": 1_000_000}  # minutes of work: under way when it is killed

        async def load_then_kill() -> list[httpx.Response | Exception]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                flight = [
                    asyncio.ensure_future(client.post("/sample", json={**body, "seed": s}))
                    for s in range(8)
                ]
                deadline = time.monotonic() + 30
                while True:  # every request admitted by the engine
                    text = (await client.get("/metrics")).text
                    if sum(metric_samples(text, "flowserve_queue_requests").values()) >= 8:
                        break
                    assert time.monotonic() < deadline, "the 8 requests never showed in /metrics"
                    await asyncio.sleep(0.05)
                os.kill(await asyncio.to_thread(engine_pid, url), signal.SIGKILL)
                started = time.monotonic()
                answers = await asyncio.gather(*flight, return_exceptions=True)
                return answers, time.monotonic() - started

        answers, waited = asyncio.run(load_then_kill())
        code = process.wait(timeout=60)
    statuses = [a.status_code for a in answers if isinstance(a, httpx.Response)]
    assert statuses == [503] * 8, answers
    for answer in answers:
        assert answer.headers["retry-after"] == "1"
        detail = answer.json()["detail"]
        assert "engine process" in detail and "Traceback" not in detail
    assert waited < 5, f"requests waited {waited:.1f} s for a dead engine"
    assert code == 1
    text = log.read_text()
    assert "the engine process exited with code -9; stopping the service" in text


@pytest.mark.e2e
def test_sigterm_with_requests_in_flight_loses_none_across_fronts(
    tiny_dir: Path, tmp_path: Path
) -> None:
    with server(tiny_dir, tmp_path, FLOW_HTTP_WORKERS="2") as (url, process, _):

        async def storm() -> list[httpx.Response]:
            async def one(seed: int) -> httpx.Response:
                async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                    return await client.post("/sample", json={**LONG, "seed": seed})

            flight = [asyncio.ensure_future(one(s)) for s in range(6)]
            deadline = time.monotonic() + 30
            while True:  # all admitted before the signal
                text = (await asyncio.to_thread(httpx.get, f"{url}/metrics")).text
                queued = metric_samples(text, "flowserve_queue_requests")
                if sum(queued.values()) >= 6 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            os.killpg(process.pid, signal.SIGTERM)
            return await asyncio.gather(*flight)

        answers = asyncio.run(storm())
        code = process.wait(timeout=60)
    assert [a.status_code for a in answers] == [200] * 6
    x = np.asarray(answers[0].json()["samples"])
    assert x.shape == (8, 2) and np.isfinite(x).all()
    assert code == 0


@pytest.mark.e2e
def test_the_queue_is_the_engine_processs_for_every_front(tiny_dir: Path, tmp_path: Path) -> None:
    limits = {
        "FLOW_MAX_QUEUE_ROWS": "16",
        "FLOW_MAX_SAMPLES": "16",
        "FLOW_HTTP_WORKERS": "2",
        "FLOW_MAX_STEPS": "10000000",
        "FLOW_MAX_ROW_STEPS": "1000000000",
    }
    with server(tiny_dir, tmp_path, **limits) as (url, _, _):

        async def fill_then_ask() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                # Minutes of work, ended by its deadline: the queue stays full meanwhile.
                body = {"model": "tiny", "num_samples": 16, "num_steps": 5_000_000, "timeout_s": 30}
                filling = asyncio.ensure_future(client.post("/sample", json=body))
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # full once the engine admitted the 16 rows
                    text = (await client.get("/metrics")).text
                    if sum(metric_samples(text, "flowserve_queue_rows").values()) >= 16:
                        break
                    await asyncio.sleep(0.02)
                async with httpx.AsyncClient(base_url=url, timeout=30) as other:
                    refused = await other.post("/sample", json={"num_samples": 1})
                filling.cancel()
                return refused

        refused = asyncio.run(fill_then_ask())
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["detail"] == (
        "queue full: 16 rows admitted, this request adds 1, the limit is 16 "
        "(FLOW_MAX_QUEUE_ROWS); retry later"
    )


def test_jobs_results_and_errors_cross_the_wire_intact() -> None:
    probes = torch.randn(3, 2, 2)
    job = Job(
        z0=torch.randn(3, 5),
        solver="rk4",
        num_steps=7,
        t0=1.0,
        t1=0.0,
        keep=[0, 7],
        divergence=Divergence("hutchinson", 2),
        probes=probes,
        condition=torch.tensor([[1.0], [2.0], [0.0]]),
        guidance=1.5,
    )
    header, tensors = ipc.decode(ipc.job_message(job, "m", 41, 2.5))
    assert (header["op"], header["id"], header["model"], header["timeout_s"]) == (
        "submit",
        41,
        "m",
        2.5,
    )
    again = ipc.read_job(header, tensors, torch.device("cpu"))
    for name in ("z0", "probes", "condition"):
        assert torch.equal(getattr(again, name), getattr(job, name))
    for name in ("solver", "num_steps", "t0", "t1", "keep", "divergence", "guidance", "rows"):
        assert getattr(again, name) == getattr(job, name)
    drawn = ipc.read_job(
        *ipc.decode(
            ipc.job_message(Job(z0=Draw(9, 4), solver="euler", num_steps=1, width=2), "m", 1, None)
        ),
        torch.device("cpu"),
    )
    assert drawn.z0 == Draw(9, 4) and (drawn.rows, drawn.width) == (4, 2)
    result = JobResult(torch.arange(6.0).reshape(3, 2), torch.zeros(2, 3, 2))
    back = ipc.read_result(*ipc.decode(ipc.result_message(3, result)))
    assert torch.equal(back.final, result.final) and torch.equal(back.trajectory, result.trajectory)
    assert back.finite  # read off the tensors where they arrive
    nan = JobResult(torch.tensor([[0.0, float("nan")]]), None)
    assert not ipc.read_result(*ipc.decode(ipc.result_message(4, nan))).finite
    error = ipc.read_error(ipc.decode(ipc.error_message(5, QueueFull(2, 15, 16)))[0])
    assert isinstance(error, QueueFull)
    assert str(error) == str(QueueFull(2, 15, 16))
    assert json.loads(bytes(ipc.encode({"op": "x"})[0])) == {"op": "x", "tensors": []}


@pytest.mark.e2e
def test_an_engine_process_never_outlives_its_service(tiny_dir: Path, tmp_path: Path) -> None:
    with server(tiny_dir, tmp_path) as (url, process, log):
        engine = engine_pid(url)
        process.kill()  # SIGKILL: the service gets no chance to stop its engine process
        process.wait()
        deadline = time.monotonic() + 10
        while _running(engine) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not _running(engine), "the engine process outlived the service"
    assert "engine process: the service let go of it (it stopped, or died)" in log.read_text()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
