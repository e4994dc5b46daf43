"""FlowClient and AsyncFlowClient: against httpx.MockTransport, a real server process, and a real
HTTP server that answers 503 before 200."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

from service import client as client_module
from service.client import (
    AsyncFlowClient,
    ConnectionFailed,
    DeadlineExceeded,
    FlowClient,
    FlowError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    trajectory_times,
)

BASE = "http://flow.test"
A = 0.5
"""Slope of the `tiny` model in conftest: v(t, x) = A x."""


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npy_response(array: np.ndarray, **headers: str) -> httpx.Response:
    return httpx.Response(
        200,
        content=npy_bytes(array),
        headers={"Content-Type": "application/x-npy", **headers},
    )


def error_response(status: int, detail: object, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"detail": detail}, headers=headers)


class Recorder:
    """A MockTransport handler that answers from a list and keeps the requests it saw."""

    def __init__(self, *answers: httpx.Response) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def body(self, index: int = -1) -> dict:
        return json.loads(self.requests[index].content)


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Seconds the clients would have slept between retries (they do not sleep)."""
    recorded: list[float] = []

    async def async_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(client_module, "_sleep", recorded.append)
    monkeypatch.setattr(client_module, "_async_sleep", async_sleep)
    return recorded


def mock_client(handler: Callable[[httpx.Request], httpx.Response], **options) -> FlowClient:
    return FlowClient(BASE, transport=httpx.MockTransport(handler), **options)


# --------------------------------------------------------------------------------------------
# Requests and answers


def test_sample_sends_the_fields_and_returns_the_npy_array() -> None:
    expected = np.arange(6, dtype=np.float32).reshape(3, 2)
    handler = Recorder(npy_response(expected, **{"X-Flow-Seed": "7"}))
    with mock_client(handler, api_key="s3cret") as client:
        samples = client.sample(model="m", num_samples=3, num_steps=10, seed=7, solver="rk4")
    np.testing.assert_array_equal(samples, expected)
    assert samples.dtype == np.float32
    request = handler.requests[0]
    assert (request.method, request.url.path) == ("POST", "/sample")
    assert request.headers["Accept"] == "application/x-npy"
    assert request.headers["Authorization"] == "Bearer s3cret"
    assert handler.body() == {
        "model": "m",
        "num_samples": 3,
        "num_steps": 10,
        "seed": 7,
        "solver": "rk4",
    }


def test_unset_fields_are_left_to_the_server_and_x0_travels_as_lists() -> None:
    handler = Recorder(npy_response(np.zeros((2, 2), np.float32)))
    with mock_client(handler) as client:
        client.sample(x0=np.array([[1.0, 2.0], [3.0, 4.5]], dtype=np.float32))
        client.sample(x0=[0.25, -1.0])
    assert handler.body(0) == {"x0": [[1.0, 2.0], [3.0, 4.5]]}
    assert handler.body(1) == {"x0": [[0.25, -1.0]]}
    assert "Authorization" not in handler.requests[0].headers


@pytest.mark.parametrize(
    ("num_steps", "stride", "kept"),
    [(10, 3, [0, 3, 6, 9, 10]), (9, 3, [0, 3, 6, 9]), (4, 1, [0, 1, 2, 3, 4]), (5, 10, [0, 5])],
)
def test_trajectory_times_come_from_the_headers(
    num_steps: int, stride: int, kept: list[int]
) -> None:
    states = np.zeros((len(kept), 4, 2), dtype=np.float32)
    headers = {"X-Flow-Num-Steps": str(num_steps), "X-Flow-Stride": str(stride)}
    handler = Recorder(npy_response(states, **headers))
    with mock_client(handler) as client:
        times, trajectory = client.trajectory(num_samples=4)
    np.testing.assert_allclose(times, np.array(kept) / num_steps)
    assert (times[0], times[-1]) == (0.0, 1.0)
    assert trajectory.shape == (len(kept), 4, 2)
    np.testing.assert_allclose(trajectory_times(num_steps, stride), times)


def test_trajectory_that_disagrees_with_its_headers_is_an_error() -> None:
    states = np.zeros((3, 4, 2), dtype=np.float32)
    handler = Recorder(npy_response(states, **{"X-Flow-Num-Steps": "10", "X-Flow-Stride": "1"}))
    with mock_client(handler) as client, pytest.raises(FlowError, match="11 times"):
        client.trajectory(num_samples=4)


def test_encode_posts_x_and_returns_latents() -> None:
    latents = np.ones((2, 3), dtype=np.float32)
    handler = Recorder(npy_response(latents))
    with mock_client(handler) as client:
        out = client.encode(x=np.zeros((2, 3)), num_steps=5, model="m")
    np.testing.assert_array_equal(out, latents)
    assert handler.requests[0].url.path == "/encode"
    assert handler.body() == {"model": "m", "x": [[0.0] * 3] * 2, "num_steps": 5}


def test_log_prob_decodes_every_field() -> None:
    answer = {
        "model": "m",
        "log_prob": [-1.0, -2.0],
        "latents": [[0.0, 1.0], [1.0, 0.0]],
        "log_p0": [-0.5, -1.5],
        "divergence_integral": [0.5, 0.5],
        "divergence_stderr": None,
    }
    handler = Recorder(httpx.Response(200, json=answer))
    with mock_client(handler) as client:
        out = client.log_prob(x=[[0.0, 1.0], [1.0, 0.0]], divergence="hutchinson", num_probes=4)
    assert handler.requests[0].headers["Accept"] == "application/json"
    assert handler.body()["divergence"] == "hutchinson"
    np.testing.assert_array_equal(out["log_prob"], [-1.0, -2.0])
    assert out["latents"].shape == (2, 2)
    assert out["divergence_stderr"] is None
    assert out["model"] == "m"  # the answer's other fields come along as they are


def test_models_and_model() -> None:
    manifest = {"name": "m", "dim": 2}
    handler = Recorder(
        httpx.Response(200, json={"models": [manifest]}), httpx.Response(200, json=manifest)
    )
    with mock_client(handler) as client:
        assert client.models() == [manifest]
        assert client.model("m") == manifest
    assert handler.requests[1].url.path == "/models/m"


def test_x0_of_the_wrong_rank_is_refused_before_sending() -> None:
    handler = Recorder(npy_response(np.zeros((1, 2), np.float32)))
    with mock_client(handler) as client, pytest.raises(ValueError, match="x0"):
        client.sample(x0=np.float32(3.0))
    assert handler.requests == []


def test_shaped_points_travel_as_npy_with_the_other_fields_as_headers() -> None:
    x0 = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 1, 3, 4)
    handler = Recorder(npy_response(np.zeros((2, 1, 3, 4), np.float32)))
    with mock_client(handler) as client:
        client.sample(x0=x0, model="img", num_steps=8, labels=[0, "seven"], guidance_scale=2.0)
    request = handler.requests[0]
    assert request.headers["Content-Type"] == "application/x-npy"
    np.testing.assert_array_equal(np.load(io.BytesIO(request.content)), x0)
    sent = {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-flow-")}
    assert sent == {
        "x-flow-model": '"img"',
        "x-flow-num-steps": "8",
        "x-flow-labels": '[0,"seven"]',
        "x-flow-guidance-scale": "2.0",
    }


def test_with_info_gives_the_seed_and_the_answer_fields() -> None:
    headers = {
        "X-Flow-Model": "m",
        "X-Flow-Seed": "123",
        "X-Flow-Num-Steps": "8",
        "X-Flow-Solver": "rk4",
        "X-Flow-Nfe": "64",
        "X-Flow-Guidance-Scale": "2.0",
        "X-Flow-Labels": "3",
    }
    handler = Recorder(npy_response(np.zeros((4, 2), np.float32), **headers))
    with mock_client(handler) as client:
        samples, info = client.sample(num_samples=4, labels=np.int64(3), with_info=True)
    assert samples.shape == (4, 2)
    assert info == client_module.AnswerInfo(
        model="m", seed=123, num_steps=8, solver="rk4", nfe=64, guidance_scale=2.0, labels=3
    )
    assert handler.body() == {"num_samples": 4, "labels": 3}


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, InvalidRequest),
        (401, Unauthorized),
        (404, ModelNotFound),
        (413, PayloadTooLarge),
        (422, InvalidRequest),
        (504, DeadlineExceeded),
        (500, ServerError),
        (502, ServerError),
        (409, FlowError),
    ],
)
def test_each_status_maps_to_its_error_with_the_detail(status: int, error: type) -> None:
    handler = Recorder(error_response(status, "num_steps: must be >= 1"))
    with mock_client(handler) as client, pytest.raises(error) as raised:
        client.sample(num_steps=0)
    assert raised.value.status_code == status
    assert raised.value.detail == "num_steps: must be >= 1"
    assert str(status) in str(raised.value)
    assert len(handler.requests) == 1


def test_validation_lists_are_flattened_into_one_line() -> None:
    detail = [{"loc": ["body", "num_steps"], "msg": "must be >= 1", "type": "x"}]
    handler = Recorder(error_response(422, detail))
    with mock_client(handler) as client, pytest.raises(InvalidRequest) as raised:
        client.sample(num_steps=0)
    assert raised.value.detail == "num_steps: must be >= 1"


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("x")],
)
def test_transport_failures_are_connection_failed(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with mock_client(handler) as client, pytest.raises(ConnectionFailed) as raised:
        client.sample()
    assert raised.value.status_code is None
    assert "/sample" in str(raised.value)


# --------------------------------------------------------------------------------------------
# Retries


def test_503_is_retried_after_retry_after(waits: list[float]) -> None:
    expected = np.ones((2, 2), dtype=np.float32)
    handler = Recorder(
        error_response(503, "queue full", **{"Retry-After": "2"}), npy_response(expected)
    )
    with mock_client(handler) as client:
        np.testing.assert_array_equal(client.sample(num_samples=2), expected)
    assert waits == [2.0]
    assert len(handler.requests) == 2


def test_retries_are_bounded(waits: list[float]) -> None:
    handler = Recorder(error_response(503, "queue full", **{"Retry-After": "1"}))
    with mock_client(handler, max_retries=3) as client, pytest.raises(ServiceUnavailable) as raised:
        client.sample()
    assert len(handler.requests) == 4
    assert waits == [1.0, 1.0, 1.0]
    assert raised.value.retry_after == 1.0
    assert raised.value.detail == "queue full"


@pytest.mark.parametrize(
    ("retry_after", "max_retry_wait", "expected"),
    [
        (None, 30.0, [1.0, 2.0]),
        ("60", 5.0, [5.0, 5.0]),
        ("0", 30.0, [0.0, 0.0]),
    ],
)
def test_retry_waits(
    waits: list[float], retry_after: str | None, max_retry_wait: float, expected: list[float]
) -> None:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    handler = Recorder(error_response(503, "not ready", **headers))
    with (
        mock_client(handler, max_retries=2, max_retry_wait=max_retry_wait) as client,
        pytest.raises(ServiceUnavailable),
    ):
        client.models()
    assert waits == expected


def test_retry_after_as_an_http_date(waits: list[float]) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    handler = Recorder(error_response(503, "busy", **{"Retry-After": when}))
    with mock_client(handler, max_retries=1) as client, pytest.raises(ServiceUnavailable):
        client.models()
    assert len(waits) == 1 and 15.0 < waits[0] <= 20.0


def test_no_retries_when_max_retries_is_zero(waits: list[float]) -> None:
    handler = Recorder(error_response(503, "busy", **{"Retry-After": "1"}))
    with mock_client(handler, max_retries=0) as client, pytest.raises(ServiceUnavailable):
        client.sample()
    assert waits == [] and len(handler.requests) == 1


def test_health_and_readiness_are_booleans_and_never_retried(waits: list[float]) -> None:
    handler = Recorder(httpx.Response(200, json={}), error_response(503, "warming up"))
    with mock_client(handler) as client:
        assert client.healthy() is True
        assert client.ready() is False
    assert waits == [] and len(handler.requests) == 2

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with mock_client(refuse) as client:
        assert client.healthy() is False
        assert client.ready() is False


# --------------------------------------------------------------------------------------------
# Async


async def test_async_client_has_the_same_answers_and_retries(waits: list[float]) -> None:
    expected = np.full((2, 2), 3.0, dtype=np.float32)
    states = np.zeros((3, 2, 2), dtype=np.float32)
    handler = Recorder(
        error_response(503, "queue full", **{"Retry-After": "3"}),
        npy_response(expected),
        npy_response(states, **{"X-Flow-Num-Steps": "4", "X-Flow-Stride": "2"}),
        error_response(404, "unknown model 'nope'"),
    )
    transport = httpx.MockTransport(handler)
    async with AsyncFlowClient(BASE, transport=transport, api_key="k") as client:
        np.testing.assert_array_equal(await client.sample(num_samples=2, seed=1), expected)
        times, trajectory = await client.trajectory(num_samples=2, num_steps=4, stride=2)
        with pytest.raises(ModelNotFound, match="nope"):
            await client.model("nope")
    assert waits == [3.0]
    np.testing.assert_allclose(times, [0.0, 0.5, 1.0])
    assert trajectory.shape == (3, 2, 2)
    assert handler.requests[0].headers["Authorization"] == "Bearer k"


async def test_async_transport_failure_is_connection_failed() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    async with AsyncFlowClient(BASE, transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(ConnectionFailed):
            await client.encode(x=[[0.0, 0.0]])
        assert await client.ready() is False


def test_importing_the_client_needs_neither_torch_nor_fastapi() -> None:
    code = (
        "import sys, service.client\n"
        "heavy = {'torch', 'fastapi', 'pydantic', 'starlette'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# Against a real server process (conftest's `tiny` model: v = A x, source N(0, I_2))


@pytest.mark.e2e
def test_real_server_sample_and_trajectory(server_url: str) -> None:
    x0 = np.array([[1.0, -2.0], [0.5, 0.0], [-3.0, 4.0]], dtype=np.float32)
    with FlowClient(server_url) as client:
        assert client.healthy() and client.ready()
        assert [m["name"] for m in client.models()] == ["tiny"]
        assert client.model("tiny")["dim"] == 2

        samples = client.sample(model="tiny", num_samples=64, num_steps=20, seed=3)
        assert samples.shape == (64, 2) and samples.dtype == np.float32
        again = client.sample(model="tiny", num_samples=64, num_steps=20, seed=3)
        np.testing.assert_array_equal(samples, again)

        # Euler on v = A x multiplies by (1 + A/K) each step.
        exact = client.sample(model="tiny", x0=x0, num_steps=8)
        np.testing.assert_allclose(exact, x0 * (1 + A / 8) ** 8, rtol=1e-5)

        times, states = client.trajectory(model="tiny", x0=x0, num_steps=10, stride=3)
        np.testing.assert_allclose(times, [0.0, 0.3, 0.6, 0.9, 1.0])
        assert states.shape == (5, 3, 2)
        np.testing.assert_allclose(states[0], x0)
        np.testing.assert_allclose(states[-1], x0 * (1 + A / 10) ** 10, rtol=1e-5)


@pytest.mark.e2e
def test_real_server_encode_and_log_prob(server_url: str) -> None:
    x = np.array([[1.0, -2.0], [0.5, 0.0]], dtype=np.float32)
    steps = 16
    with FlowClient(server_url) as client:
        try:
            latents = client.encode(model="tiny", x=x, num_steps=steps)
        except ModelNotFound as exc:
            pytest.skip(f"the server has no /encode yet: {exc}")
        # Backward Euler on v = A x multiplies by (1 - A/K) each step.
        np.testing.assert_allclose(latents, x * (1 - A / steps) ** steps, rtol=1e-5)

        out = client.log_prob(model="tiny", x=x, num_steps=steps, divergence="exact")
    # div v = 2A everywhere, so the integral is 2A for any solver, and log p0 is N(0, I_2)'s.
    np.testing.assert_allclose(out["latents"], latents, rtol=1e-5)
    log_p0 = -0.5 * (out["latents"].astype(np.float64) ** 2).sum(axis=1) - np.log(2 * np.pi)
    np.testing.assert_allclose(out["divergence_integral"], 2 * A, rtol=1e-4)
    np.testing.assert_allclose(out["log_p0"], log_p0, rtol=1e-4)
    np.testing.assert_allclose(out["log_prob"], log_p0 - 2 * A, rtol=1e-4)
    assert out["divergence_stderr"] is None


@pytest.mark.e2e
def test_real_server_errors_are_mapped(server_url: str) -> None:
    with FlowClient(server_url) as client:
        with pytest.raises(ModelNotFound) as missing:
            client.sample(model="no-such-model", num_samples=1)
        assert missing.value.status_code == 404
        assert "no-such-model" in missing.value.detail
        with pytest.raises(InvalidRequest) as invalid:
            client.sample(model="tiny", num_samples=1, num_steps=0)
        assert invalid.value.status_code == 422
        assert "num_steps" in invalid.value.detail
        with pytest.raises(InvalidRequest):
            client.sample(model="tiny", x0=[[1.0, 2.0, 3.0]])


@pytest.mark.e2e
async def test_real_server_async_client(server_url: str) -> None:
    async with AsyncFlowClient(server_url) as client:
        assert await client.ready()
        first = await client.sample(model="tiny", num_samples=16, num_steps=5, seed=11)
    with FlowClient(server_url) as client:
        second = client.sample(model="tiny", num_samples=16, num_steps=5, seed=11)
    np.testing.assert_array_equal(first, second)


class _BusyOnceHandler(BaseHTTPRequestHandler):
    """POST /sample: 503 with Retry-After on the first call, then a .npy answer."""

    calls: list[float]
    retry_after = 1

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.calls.append(time.monotonic())
        if len(self.calls) == 1:
            body = json.dumps({"detail": "queue full"}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Retry-After", str(self.retry_after))
        else:
            body = npy_bytes(np.full((2, 2), 7.0, dtype=np.float32))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-npy")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def busy_once_url() -> Iterator[tuple[str, list[float]]]:
    calls: list[float] = []
    handler = type("Handler", (_BusyOnceHandler,), {"calls": calls})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", calls
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_real_http_503_then_200_waits_retry_after(busy_once_url: tuple[str, list[float]]) -> None:
    url, calls = busy_once_url
    with FlowClient(url, max_retries=2) as client:
        samples = client.sample(num_samples=2)
    np.testing.assert_array_equal(samples, np.full((2, 2), 7.0, dtype=np.float32))
    assert len(calls) == 2
    assert calls[1] - calls[0] >= _BusyOnceHandler.retry_after - 0.05
