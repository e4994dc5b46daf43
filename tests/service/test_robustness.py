"""Overload, deadlines, clients that leave, SIGTERM and models that produce NaN: the service keeps
giving correct numbers or a clear refusal, and loses no accepted request."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import (
    REPO_ROOT,
    euler_reference,
    free_port,
    running_server,
    service_command,
    serving,
    stop,
    wait_ready,
    write_module_dir,
)
from prometheus_client.parser import text_string_to_metric_families

A = 0.5
"""Slope of the `tiny` model in conftest: v(t, x) = A x, so Euler gives x[K] = (1 + A/K)^K x0."""

QUEUE_ROWS = 512
LONG = {"num_samples": 256, "num_steps": 200_000}  # minutes of work unless it is dropped
ROOMY_LIMITS = {"FLOW_MAX_STEPS": "1000000", "FLOW_MAX_ROW_STEPS": "1000000000"}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample `name` with `labels` in Prometheus text; 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def child_env(**settings: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_")}
    return {**inherited, "PYTHONUNBUFFERED": "1", "FLOW_DEVICE": "cpu", **settings}


@pytest.fixture(scope="module")
def small_queue_server(
    tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real server on `tiny` whose queue holds QUEUE_ROWS rows; long jobs are allowed."""
    port = free_port()
    log = tmp_path_factory.mktemp("small-queue") / "server.log"
    env = {
        "FLOW_DEVICE": "cpu",
        "FLOW_MAX_QUEUE_ROWS": str(QUEUE_ROWS),
        "FLOW_MAX_SAMPLES": str(QUEUE_ROWS),
        **ROOMY_LIMITS,
    }
    with running_server(service_command(tiny_models_dir, port), port, log, env=env) as url:
        yield url


def closed_form(x0: np.ndarray, num_steps: int) -> np.ndarray:
    return (1 + A / num_steps) ** num_steps * x0


async def test_four_times_the_queue_gets_correct_answers_or_503(small_queue_server) -> None:
    url, rows, num_steps, clients = small_queue_server, 64, 1000, 32  # 4 x 512 rows at once

    def body(seed: int) -> dict:
        return {"num_samples": rows, "num_steps": num_steps, "stride": num_steps, "seed": seed}

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        answers = await asyncio.gather(
            *(client.post("/trajectory", json=body(seed)) for seed in range(clients))
        )
        statuses = [a.status_code for a in answers]
        assert set(statuses) == {200, 503}, statuses
        full = re.compile(
            rf"queue full: \d+ rows admitted, this request adds {rows}, "
            rf"the limit is {QUEUE_ROWS} \(FLOW_MAX_QUEUE_ROWS\); retry later"
        )
        for seed, answer in enumerate(answers):
            if answer.status_code == 503:
                assert answer.headers["Retry-After"] == "1"
                assert full.fullmatch(answer.json()["detail"]), answer.json()
                continue
            x0, final = np.asarray(answer.json()["trajectory"], dtype=np.float32)
            np.testing.assert_allclose(final, closed_form(x0, num_steps), rtol=2e-4)
            solo = await client.post("/trajectory", json=body(seed))
            np.testing.assert_array_equal(solo.json()["trajectory"], answer.json()["trajectory"])
        assert (await client.get("/healthz")).status_code == 200
        text = (await client.get("/metrics")).text
    assert metric(text, "flowserve_queue_rows", model="tiny") == 0
    assert metric(text, "flowserve_queue_requests", model="tiny") == 0


async def wait_for_metric(client: httpx.AsyncClient, name: str, value: float, **labels) -> float:
    """Polls /metrics until `name` reaches `value` (or 30 s pass); returns the last reading."""
    seen = 0.0
    for _ in range(300):
        seen = metric((await client.get("/metrics")).text, name, **labels)
        if seen >= value:
            break
        await asyncio.sleep(0.1)
    return seen


async def test_a_client_that_disconnects_has_its_rows_dropped(small_queue_server) -> None:
    dropped = {"name": "flowserve_rows_dropped_total", "model": "tiny", "reason": "disconnect"}
    async with httpx.AsyncClient(base_url=small_queue_server, timeout=60) as client:
        before = metric((await client.get("/metrics")).text, **dropped)
        async with httpx.AsyncClient(base_url=small_queue_server, timeout=0.5) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post("/sample", json=LONG)
        name = dropped.pop("name")
        after = await wait_for_metric(client, name, before + LONG["num_samples"], **dropped)
        assert after - before == LONG["num_samples"]
        queued = await wait_for_metric(client, "flowserve_queue_rows", 0, model="tiny")
        assert queued == 0


async def test_a_deadline_on_a_real_server_is_504_and_drops_the_rows(small_queue_server) -> None:
    labels = {"model": "tiny", "reason": "deadline"}
    async with httpx.AsyncClient(base_url=small_queue_server, timeout=60) as client:
        before = metric(
            (await client.get("/metrics")).text, "flowserve_rows_dropped_total", **labels
        )
        answer = await client.post("/sample", json={**LONG, "timeout_s": 0.05})
        assert answer.status_code == 504
        assert answer.json() == {
            "detail": "timeout_s: no answer within 0.05 s; the work was stopped"
        }
        text = (await client.get("/metrics")).text
    after = metric(text, "flowserve_rows_dropped_total", **labels)
    assert after - before == LONG["num_samples"]
    assert metric(text, "flowserve_queue_rows", model="tiny") == 0


@pytest.mark.parametrize(
    ("request_timeout_s", "timeout_s", "told"),
    [(300.0, 0.05, "0.05"), (0.05, None, "0.05"), (0.05, 100.0, "0.05")],
    ids=["per-request", "setting", "per-request-capped"],
)
def test_past_the_deadline_the_answer_is_504_and_the_rows_leave_the_batch(
    tiny_models_dir: Path, request_timeout_s, timeout_s, told
) -> None:
    limits = {"max_steps": 10**6, "max_row_steps": 10**9}
    with serving(tiny_models_dir, request_timeout_s=request_timeout_s, **limits) as client:
        body = {**LONG, "timeout_s": timeout_s}
        answer = client.post("/sample", json={k: v for k, v in body.items() if v is not None})
        engine = client.app.state.registry.served["tiny"].engine
        assert answer.status_code == 504
        assert answer.json() == {
            "detail": f"timeout_s: no answer within {told} s; the work was stopped"
        }
        # The answer comes at the deadline; the engine drops the rows at its next pass.
        settled = time.monotonic() + 30
        while engine.stats.jobs_failed == 0 and time.monotonic() < settled:
            time.sleep(0.01)
        assert engine.stats.rows_dropped == {"deadline": LONG["num_samples"]}
        assert engine.stats.jobs_failed == 1
        assert engine.queued_rows == 0


def test_sigterm_lets_requests_in_flight_finish_and_exits_0(tiny_models_dir, tmp_path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    rows, num_steps, count = 128, 10_000, 4  # a few seconds of work, started before SIGTERM
    with log.open("wb") as out:
        process = subprocess.Popen(
            service_command(tiny_models_dir, port),
            cwd=REPO_ROOT,
            env=child_env(**ROOMY_LIMITS),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(url, process, log, timeout=90)

        async def storm() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                body = {"num_samples": rows, "num_steps": num_steps, "stride": num_steps}
                flight = [
                    asyncio.ensure_future(client.post("/trajectory", json={**body, "seed": s}))
                    for s in range(count)
                ]
                queued = await wait_for_metric(client, "flowserve_queue_requests", count)
                assert queued == count
                process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*flight)

        answers = asyncio.run(storm())
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        stop(process)
    assert [a.status_code for a in answers] == [200] * count
    for answer in answers:
        x0, final = np.asarray(answer.json()["trajectory"], dtype=np.float32)
        np.testing.assert_allclose(final, closed_form(x0, num_steps), rtol=1e-3)


class SqrtField(torch.nn.Module):
    """v(t, x) = sqrt(x) - x: NaN wherever a coordinate is negative, finite elsewhere."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x) - x + 0.0 * t


@pytest.fixture(scope="module")
def nan_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    root = tmp_path_factory.mktemp("nan-models")
    source = {"means": [[1.0, 1.0]], "covs": [[[0.1, 0.0], [0.0, 0.1]]], "weights": [1.0]}
    write_module_dir(root, "sqrt", SqrtField(), source, dim=2)
    with serving(root) as client:
        yield client


GOOD, BAD = [[1.0, 4.0], [0.25, 2.0]], [[1.0, 4.0], [-1.0, 2.0]]
NAN_CASES = [
    ("/sample", {"x0": BAD, "num_steps": 8}, {}),
    ("/sample", {"x0": BAD, "num_steps": 8}, {"Accept": "application/x-npy"}),
    ("/trajectory", {"x0": BAD, "num_steps": 8, "stride": 2}, {}),
    ("/encode", {"x": BAD, "num_steps": 8}, {}),
    ("/log_prob", {"x": BAD, "num_steps": 8}, {}),
]


@pytest.mark.parametrize(("path", "body", "headers"), NAN_CASES)
def test_non_finite_model_output_is_500_and_counted(nan_client, path, body, headers) -> None:
    def refused() -> float:
        return metric(nan_client.get("/metrics").text, "flowserve_nonfinite_answers_total")

    before = refused()
    answer = nan_client.post(path, json=body, headers=headers)
    assert answer.status_code == 500
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json() == {
        "detail": "model sqrt produced non-finite values (NaN or infinity) for this request; "
        "no data was returned"
    }
    assert refused() == before + 1


def test_the_same_model_answers_finite_inputs(nan_client) -> None:
    answer = nan_client.post("/sample", json={"x0": GOOD, "num_steps": 8})
    assert answer.status_code == 200
    expected = euler_reference(SqrtField(), torch.tensor(GOOD), 8)
    np.testing.assert_allclose(answer.json()["samples"], expected.numpy(), rtol=1e-6)
