"""`python -m service` as a real process on a free port: readiness, answers over real HTTP, and
one structured access-log line per request."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import free_port, running_server, service_command, write_model_dir

pytestmark = pytest.mark.e2e

A = 0.5
"""Slope of the served model: v(t, x) = A x."""
LOG_WAIT_S = 15.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    models = tmp_path_factory.mktemp("e2e-models")
    write_model_dir(models, "line", dim=2, a=A)
    log = tmp_path_factory.mktemp("e2e-log") / "server.log"
    port = free_port()
    env = {"FLOW_DEVICE": "cpu", "FLOW_LOG_LEVEL": "info", "FLOW_TORCH_THREADS": "1"}
    with running_server(service_command(models, port), port, log, env=env) as url:
        yield url, log


def access_lines(log: Path) -> list[dict]:
    lines = []
    for line in log.read_text().splitlines():
        _, marker, payload = line.partition(" flowserve.access ")
        if marker:
            lines.append(json.loads(payload))
    return lines


def wait_for_access_line(log: Path, path: str, **fields: object) -> dict:
    """The access line for `path` with `fields`; the server writes it just after answering."""
    deadline = time.monotonic() + LOG_WAIT_S
    while time.monotonic() < deadline:
        for line in access_lines(log):
            if line["path"] == path and all(line.get(k) == v for k, v in fields.items()):
                return line
        time.sleep(0.05)
    pytest.fail(f"no access line for {path} {fields}:\n{log.read_text()[-3000:]}")


def test_ready_and_healthy(server: tuple[str, Path]) -> None:
    url, _ = server
    ready = httpx.get(f"{url}/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready", "models": ["line"]})
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}


def test_sample_json_and_npy(server: tuple[str, Path]) -> None:
    url, _ = server
    x0 = [[1.0, -2.0], [0.5, 4.0], [-3.0, 0.0]]
    response = httpx.post(f"{url}/sample", json={"x0": x0, "num_steps": 10})
    assert response.status_code == 200
    body = response.json()
    expected = np.array(x0) * (1 + A / 10) ** 10
    np.testing.assert_allclose(body["samples"], expected, rtol=1e-6)
    assert (body["model"], body["num_samples"], body["num_steps"], body["dim"]) == (
        "line",
        3,
        10,
        2,
    )

    seeded = {"num_samples": 6, "num_steps": 5, "seed": 42}
    response = httpx.post(f"{url}/sample", json=seeded, headers={"Accept": "application/x-npy"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-npy"
    assert response.headers["x-flow-seed"] == "42"
    array = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert (array.dtype, array.shape) == (np.float32, (6, 2))
    again = httpx.post(f"{url}/sample", json=seeded).json()["samples"]
    np.testing.assert_array_equal(array, np.asarray(again, dtype=np.float32))


def test_trajectory(server: tuple[str, Path]) -> None:
    url, _ = server
    x0 = [[2.0, 1.0]]
    response = httpx.post(f"{url}/trajectory", json={"x0": x0, "num_steps": 5, "stride": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["times"] == [0.0, 0.4, 0.8, 1.0]
    factors = [(1 + A / 5) ** k for k in (0, 2, 4, 5)]
    expected = np.array([[[f * v for v in x0[0]]] for f in factors])
    np.testing.assert_allclose(body["trajectory"], expected, rtol=1e-6)

    response = httpx.post(
        f"{url}/trajectory",
        json={"num_samples": 3, "num_steps": 4, "seed": 1},
        headers={"Accept": "application/x-npy"},
    )
    path = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert (path.dtype, path.shape) == (np.float32, (5, 3, 2))


def test_errors_over_real_http(server: tuple[str, Path]) -> None:
    url, _ = server
    bad = httpx.post(
        f"{url}/sample", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert bad.status_code == 422
    assert bad.json()["detail"].startswith("body: not valid JSON")
    missing = httpx.post(f"{url}/sample", json={"model": "nope", "num_samples": 1})
    assert missing.status_code == 404


def test_one_structured_log_line_per_request(server: tuple[str, Path]) -> None:
    url, log = server
    response = httpx.post(f"{url}/sample", json={"num_samples": 7, "num_steps": 3, "seed": 9})
    assert response.status_code == 200
    line = wait_for_access_line(log, "/sample", num_samples=7, num_steps=3)
    assert line["model"] == "line"
    assert line["status"] == 200
    assert line["method"] == "POST"
    assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0

    httpx.post(f"{url}/sample", json={"num_samples": 8, "num_steps": 20000})
    refused = wait_for_access_line(log, "/sample", num_samples=8, num_steps=20000)
    assert (refused["model"], refused["status"]) == ("line", 413)

    httpx.get(f"{url}/models/line")
    wait_for_access_line(log, "/models/line", status=200)
    lines = [entry for entry in access_lines(log) if entry["path"] == "/sample"]
    assert len([e for e in lines if e.get("num_samples") == 7]) == 1
