"""Python client for the flowserve HTTP API: numpy arrays in and out.

    from service.client import FlowClient

    with FlowClient("http://127.0.0.1:8000") as client:
        x1 = client.sample(num_samples=1000, num_steps=100, seed=7)     # (1000, d) float32
        times, path = client.trajectory(num_samples=8, stride=10)      # (T,), (T, 8, d)
        z = client.encode(x=x1, num_steps=100)                          # (1000, d) float32
        lp = client.log_prob(x=x1[:10])["log_prob"]                     # (10,) float64

`AsyncFlowClient` has the same methods as coroutines. Arrays travel as .npy (`Accept:
application/x-npy`) rather than JSON lists, which is smaller and keeps float32 exact.

Every failure raises a `FlowError` subclass that carries the HTTP `status_code` and the server's
`detail`. Only 503 (queue full, not ready) is retried: at most `max_retries` times, waiting the
server's `Retry-After` (capped by `max_retry_wait`), so a retry never adds load the server has just
said it cannot take.

The sync and async classes are thin: building requests, decoding answers, mapping errors and the
retry policy are plain functions shared by both. This module imports only httpx and numpy.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, Self, TypeVar
from urllib.parse import quote

import httpx
import numpy as np

from service.tableau import kept_steps

__all__ = [
    "AsyncFlowClient",
    "ConnectionFailed",
    "DeadlineExceeded",
    "FlowClient",
    "FlowError",
    "InvalidRequest",
    "ModelNotFound",
    "PayloadTooLarge",
    "ServerError",
    "ServiceUnavailable",
    "Unauthorized",
    "trajectory_times",
]

NPY_MEDIA_TYPE = "application/x-npy"
DEFAULT_RETRY_WAIT = 1.0
"""Seconds before the first retry of a 503 that names no Retry-After; doubles per attempt."""

T = TypeVar("T")
ArrayLike = Any
"""Anything `np.asarray` turns into a (n, d) array of floats: an ndarray, nested lists."""


# --------------------------------------------------------------------------------------------
# Errors


class FlowError(Exception):
    """A request that did not succeed. `status_code` is None when no HTTP answer came back."""

    def __init__(self, detail: str, status_code: int | None = None) -> None:
        self.detail = detail
        self.status_code = status_code
        super().__init__(f"HTTP {status_code}: {detail}" if status_code is not None else detail)


class InvalidRequest(FlowError):
    """422 (or 400): the body is malformed or a field is out of range; `detail` names it."""


class ModelNotFound(FlowError):
    """404: no model of that name is loaded."""


class PayloadTooLarge(FlowError):
    """413: over a server limit (rows, steps, trajectory size, body size); `detail` gives it."""


class Unauthorized(FlowError):
    """401: the server has an API key and the request lacked the right one."""


class ServiceUnavailable(FlowError):
    """503: the queue is full or the models are not ready; retried by the client first."""

    def __init__(self, detail: str, status_code: int = 503, retry_after: float | None = None):
        super().__init__(detail, status_code)
        self.retry_after = retry_after


class DeadlineExceeded(FlowError):
    """504: the request outlived its deadline (`timeout_s`, capped by the server's)."""


class ServerError(FlowError):
    """Any other 5xx: a fault on the server's side."""


class ConnectionFailed(FlowError):
    """No HTTP answer: the server is unreachable, or the connection or a timeout failed."""


_ERRORS_BY_STATUS: dict[int, type[FlowError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: ModelNotFound,
    413: PayloadTooLarge,
    422: InvalidRequest,
    503: ServiceUnavailable,
    504: DeadlineExceeded,
}


def _detail(response: httpx.Response) -> str:
    """The server's `detail` as one line; FastAPI's validation lists are flattened."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            else:
                parts.append(str(item))
        detail = "; ".join(parts)
    if not detail:
        detail = response.text.strip()[:200] or response.reason_phrase or "no detail"
    return " ".join(str(detail).split())


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _raise_for_status(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    detail = _detail(response)
    if status == 503:
        raise ServiceUnavailable(detail, status, retry_after=_retry_after(response))
    error = _ERRORS_BY_STATUS.get(status)
    if error is None:
        error = ServerError if status >= 500 else FlowError
    raise error(detail, status)


def _connection_failed(exc: Exception, request: _Request[Any]) -> ConnectionFailed:
    try:
        url = str(exc.request.url)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        url = request.path
    what = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    reason = str(exc) or type(exc).__name__
    return ConnectionFailed(f"{request.method} {url} {what}: {reason}")


@dataclass(frozen=True)
class _RetryPolicy:
    max_retries: int
    max_wait: float

    def wait(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying `response`, or None to return it as it is.

        `attempt` counts the retries already made (0 for the first answer).
        """
        if response.status_code != 503 or attempt >= self.max_retries:
            return None
        after = _retry_after(response)
        if after is None:
            after = DEFAULT_RETRY_WAIT * 2**attempt
        return min(after, self.max_wait)


# --------------------------------------------------------------------------------------------
# Requests and answers


@dataclass(frozen=True)
class _Request(Generic[T]):
    """One API call: what to send, and how to turn a successful answer into a value."""

    method: str
    path: str
    decode: Callable[[httpx.Response], T]
    body: dict[str, Any] | None = None
    accept: str = "application/json"
    headers: dict[str, str] = field(init=False)
    content: bytes | None = field(init=False)

    def __post_init__(self) -> None:
        headers = {"Accept": self.accept}
        content = None
        if self.body is not None:
            # Serialized here rather than by httpx so a non-finite number reaches the server, which
            # answers it with a 422 that names the field, instead of failing inside httpx.
            content = json.dumps(self.body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "content", content)


def _body(**fields: Any) -> dict[str, Any]:
    """The JSON body: fields left as None are omitted so the server's defaults apply."""
    return {name: value for name, value in fields.items() if value is not None}


def _points(value: ArrayLike | None, name: str) -> list[list[float]] | None:
    """A (n, d) list of floats for the wire; a single point (d,) becomes (1, d)."""
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{name} must be a (n, d) array of points, got shape {array.shape}")
    return array.tolist()


def _load_npy(response: httpx.Response) -> np.ndarray:
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    if media_type != NPY_MEDIA_TYPE:
        raise FlowError(
            f"expected {NPY_MEDIA_TYPE} from {response.request.url.path}, got {media_type!r}",
            response.status_code,
        )
    try:
        return np.load(io.BytesIO(response.content), allow_pickle=False)
    except ValueError as exc:
        raise FlowError(f"unreadable .npy answer: {exc}", response.status_code) from exc


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise FlowError(f"unreadable JSON answer: {exc}", response.status_code) from exc


def _int_header(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def trajectory_times(num_steps: int, stride: int) -> np.ndarray:
    """Times k/K of the states /trajectory keeps: k = 0, stride, 2 stride, ..., and K last.

    num_steps K = 10, stride 3 -> k = 0, 3, 6, 9, 10. Returns float64 (T,).
    """
    return np.asarray(kept_steps(num_steps, stride), dtype=np.float64) / num_steps


def _trajectory_decoder(
    num_steps: int | None, stride: int | None
) -> Callable[[httpx.Response], tuple[np.ndarray, np.ndarray]]:
    def decode(response: httpx.Response) -> tuple[np.ndarray, np.ndarray]:
        states = _load_npy(response)
        # The server's headers say which steps it kept; the request's values are a fallback.
        steps = _int_header(response, "X-Flow-Num-Steps") or num_steps
        every = _int_header(response, "X-Flow-Stride") or stride or 1
        if steps is None:
            raise FlowError("trajectory answer lacks X-Flow-Num-Steps", response.status_code)
        times = trajectory_times(steps, every)
        if states.ndim != 3 or states.shape[0] != times.shape[0]:
            raise FlowError(
                f"trajectory of shape {states.shape} does not match {times.shape[0]} times "
                f"(num_steps {steps}, stride {every})",
                response.status_code,
            )
        return times, states

    return decode


def _decode_log_prob(response: httpx.Response) -> dict[str, np.ndarray | None]:
    data = _json(response)
    out: dict[str, np.ndarray | None] = {}
    for key in ("log_prob", "log_p0", "divergence_integral", "divergence_stderr"):
        value = data.get(key)
        out[key] = None if value is None else np.asarray(value, dtype=np.float64)
    latents = data.get("latents")
    out["latents"] = None if latents is None else np.asarray(latents, dtype=np.float32)
    return out


def _sample_request(
    model: str | None,
    num_samples: int | None,
    num_steps: int | None,
    seed: int | None,
    x0: ArrayLike | None,
    solver: str | None,
    timeout_s: float | None,
) -> _Request[np.ndarray]:
    body = _body(
        model=model,
        num_samples=num_samples,
        num_steps=num_steps,
        seed=seed,
        x0=_points(x0, "x0"),
        solver=solver,
        timeout_s=timeout_s,
    )
    return _Request("POST", "/sample", _load_npy, body, NPY_MEDIA_TYPE)


def _trajectory_request(
    model: str | None,
    num_samples: int | None,
    num_steps: int | None,
    seed: int | None,
    x0: ArrayLike | None,
    stride: int | None,
    solver: str | None,
    timeout_s: float | None,
) -> _Request[tuple[np.ndarray, np.ndarray]]:
    body = _body(
        model=model,
        num_samples=num_samples,
        num_steps=num_steps,
        seed=seed,
        x0=_points(x0, "x0"),
        stride=stride,
        solver=solver,
        timeout_s=timeout_s,
    )
    decode = _trajectory_decoder(num_steps, stride)
    return _Request("POST", "/trajectory", decode, body, NPY_MEDIA_TYPE)


def _encode_request(
    x: ArrayLike,
    model: str | None,
    num_steps: int | None,
    solver: str | None,
    timeout_s: float | None,
) -> _Request[np.ndarray]:
    body = _body(
        model=model, x=_points(x, "x"), num_steps=num_steps, solver=solver, timeout_s=timeout_s
    )
    return _Request("POST", "/encode", _load_npy, body, NPY_MEDIA_TYPE)


def _log_prob_request(
    x: ArrayLike,
    model: str | None,
    num_steps: int | None,
    solver: str | None,
    divergence: str | None,
    num_probes: int | None,
    seed: int | None,
    timeout_s: float | None,
) -> _Request[dict[str, np.ndarray | None]]:
    body = _body(
        model=model,
        x=_points(x, "x"),
        num_steps=num_steps,
        solver=solver,
        divergence=divergence,
        num_probes=num_probes,
        seed=seed,
        timeout_s=timeout_s,
    )
    return _Request("POST", "/log_prob", _decode_log_prob, body)


def _models_request() -> _Request[list[dict[str, Any]]]:
    return _Request("GET", "/models", lambda r: list(_json(r)["models"]))


def _model_request(name: str) -> _Request[dict[str, Any]]:
    return _Request("GET", f"/models/{quote(name, safe='')}", _json)


def _client_options(base_url: str, api_key: str | None, timeout: float) -> dict[str, Any]:
    headers = {"User-Agent": "flowserve-client"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return {"base_url": base_url, "headers": headers, "timeout": timeout}


# Module-level so tests can record the waits instead of sleeping.
_sleep: Callable[[float], None] = time.sleep
_async_sleep: Callable[[float], Any] = asyncio.sleep


# --------------------------------------------------------------------------------------------
# Clients


class FlowClient:
    """Blocking client. Use as a context manager, or call `close()` when done.

    base_url: e.g. "http://127.0.0.1:8000". api_key: sent as `Authorization: Bearer <key>`.
    timeout: seconds per HTTP attempt (connect, read, write each). max_retries: retries of a 503.
    max_retry_wait: cap on one wait between retries, in seconds. transport: an httpx transport
    (e.g. `httpx.MockTransport`) in place of the network.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._retry = _RetryPolicy(max_retries, max_retry_wait)
        self._http = httpx.Client(
            transport=transport, **_client_options(base_url, api_key, timeout)
        )

    def _call(self, request: _Request[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    request.method, request.path, content=request.content, headers=request.headers
                )
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise _connection_failed(exc, request) from exc
            wait = self._retry.wait(response, attempt)
            if wait is None:
                _raise_for_status(response)
                return request.decode(response)
            _sleep(wait)
            attempt += 1

    def sample(
        self,
        *,
        model: str | None = None,
        num_samples: int | None = None,
        num_steps: int | None = None,
        seed: int | None = None,
        x0: ArrayLike | None = None,
        solver: str | None = None,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """Samples x[K] of the flow: float32 (num_samples, dim). `x0` (n, dim) fixes the starts."""
        return self._call(
            _sample_request(model, num_samples, num_steps, seed, x0, solver, timeout_s)
        )

    def trajectory(
        self,
        *,
        model: str | None = None,
        num_samples: int | None = None,
        num_steps: int | None = None,
        seed: int | None = None,
        x0: ArrayLike | None = None,
        stride: int | None = None,
        solver: str | None = None,
        timeout_s: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The kept states: times float64 (T,) from 0 to 1, states float32 (T, num_samples, dim)."""
        return self._call(
            _trajectory_request(model, num_samples, num_steps, seed, x0, stride, solver, timeout_s)
        )

    def encode(
        self,
        *,
        x: ArrayLike,
        model: str | None = None,
        num_steps: int | None = None,
        solver: str | None = None,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """Latents: `x` (n, dim) integrated back from t = 1 to t = 0, float32 (n, dim)."""
        return self._call(_encode_request(x, model, num_steps, solver, timeout_s))

    def log_prob(
        self,
        *,
        x: ArrayLike,
        model: str | None = None,
        num_steps: int | None = None,
        solver: str | None = None,
        divergence: str | None = None,
        num_probes: int | None = None,
        seed: int | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray | None]:
        """Model log-density of `x` (n, dim).

        Returns "log_prob" (n,), "latents" (n, dim) float32, "log_p0" (n,),
        "divergence_integral" (n,) and "divergence_stderr" (n,) for "hutchinson" with
        num_probes > 1, else None. `divergence` left out: "exact" up to the server's
        FLOW_MAX_EXACT_DIVERGENCE_DIM (16 by default), "hutchinson" above.
        """
        return self._call(
            _log_prob_request(x, model, num_steps, solver, divergence, num_probes, seed, timeout_s)
        )

    def models(self) -> list[dict[str, Any]]:
        """Manifests of the loaded models."""
        return self._call(_models_request())

    def model(self, name: str) -> dict[str, Any]:
        """One model's manifest; `ModelNotFound` if none has that name."""
        return self._call(_model_request(name))

    def healthy(self) -> bool:
        """True while the server process answers /healthz."""
        return self._probe("/healthz")

    def ready(self) -> bool:
        """True once the models are loaded and warm (/readyz 200). Never retried."""
        return self._probe("/readyz")

    def _probe(self, path: str) -> bool:
        try:
            return self._http.get(path).status_code == 200
        except (httpx.HTTPError, httpx.InvalidURL):
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncFlowClient:
    """Asyncio client with the same methods and options as `FlowClient`, as coroutines.

    Use `async with`, or `await close()` when done.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._retry = _RetryPolicy(max_retries, max_retry_wait)
        self._http = httpx.AsyncClient(
            transport=transport, **_client_options(base_url, api_key, timeout)
        )

    async def _call(self, request: _Request[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    request.method, request.path, content=request.content, headers=request.headers
                )
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise _connection_failed(exc, request) from exc
            wait = self._retry.wait(response, attempt)
            if wait is None:
                _raise_for_status(response)
                return request.decode(response)
            await _async_sleep(wait)
            attempt += 1

    async def sample(
        self,
        *,
        model: str | None = None,
        num_samples: int | None = None,
        num_steps: int | None = None,
        seed: int | None = None,
        x0: ArrayLike | None = None,
        solver: str | None = None,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """See `FlowClient.sample`."""
        return await self._call(
            _sample_request(model, num_samples, num_steps, seed, x0, solver, timeout_s)
        )

    async def trajectory(
        self,
        *,
        model: str | None = None,
        num_samples: int | None = None,
        num_steps: int | None = None,
        seed: int | None = None,
        x0: ArrayLike | None = None,
        stride: int | None = None,
        solver: str | None = None,
        timeout_s: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """See `FlowClient.trajectory`."""
        return await self._call(
            _trajectory_request(model, num_samples, num_steps, seed, x0, stride, solver, timeout_s)
        )

    async def encode(
        self,
        *,
        x: ArrayLike,
        model: str | None = None,
        num_steps: int | None = None,
        solver: str | None = None,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """See `FlowClient.encode`."""
        return await self._call(_encode_request(x, model, num_steps, solver, timeout_s))

    async def log_prob(
        self,
        *,
        x: ArrayLike,
        model: str | None = None,
        num_steps: int | None = None,
        solver: str | None = None,
        divergence: str | None = None,
        num_probes: int | None = None,
        seed: int | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray | None]:
        """See `FlowClient.log_prob`."""
        return await self._call(
            _log_prob_request(x, model, num_steps, solver, divergence, num_probes, seed, timeout_s)
        )

    async def models(self) -> list[dict[str, Any]]:
        """See `FlowClient.models`."""
        return await self._call(_models_request())

    async def model(self, name: str) -> dict[str, Any]:
        """See `FlowClient.model`."""
        return await self._call(_model_request(name))

    async def healthy(self) -> bool:
        """See `FlowClient.healthy`."""
        return await self._probe("/healthz")

    async def ready(self) -> bool:
        """See `FlowClient.ready`."""
        return await self._probe("/readyz")

    async def _probe(self, path: str) -> bool:
        try:
            return (await self._http.get(path)).status_code == 200
        except (httpx.HTTPError, httpx.InvalidURL):
            return False

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
