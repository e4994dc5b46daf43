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

Conditional models take `labels` (class models) or `condition` (vector models) and
`guidance_scale`; shaped models answer (n, *shape) arrays and take (n, *shape) points, which
travel as a .npy body. `with_info=True` also returns an `AnswerInfo` (model, seed, steps, solver,
nfe, guidance), so any answer can be reproduced.

The sync and async classes are thin: building requests, decoding answers, mapping errors and the
retry policy are plain functions shared by both. This module imports only httpx, numpy and the
torch-free `service.tableau`.
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
    "AnswerInfo",
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
Labels = Any
"""A class index or name for every row, or a sequence (list, ndarray) of one per row."""


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
class AnswerInfo:
    """What an answer says besides its numbers, so it can be reproduced: the model that served
    it, the seed of its start points (None when they were given), the step count, solver and
    network evaluations per row, the stride of a trajectory, and for conditional models the
    guidance scale and the label when every row had the same one."""

    model: str | None = None
    seed: int | None = None
    num_steps: int | None = None
    solver: str | None = None
    nfe: int | None = None
    stride: int | None = None
    guidance_scale: float | None = None
    labels: int | None = None

    @classmethod
    def from_headers(cls, response: httpx.Response) -> AnswerInfo:
        headers = response.headers
        scale = headers.get("X-Flow-Guidance-Scale")
        return cls(
            model=headers.get("X-Flow-Model"),
            seed=_int_header(response, "X-Flow-Seed"),
            num_steps=_int_header(response, "X-Flow-Num-Steps"),
            solver=headers.get("X-Flow-Solver"),
            nfe=_int_header(response, "X-Flow-Nfe"),
            stride=_int_header(response, "X-Flow-Stride"),
            guidance_scale=float(scale) if scale is not None else None,
            labels=_int_header(response, "X-Flow-Labels"),
        )


@dataclass(frozen=True)
class _Request(Generic[T]):
    """One API call: what to send, and how to turn a successful answer into a value.

    A body whose `npy` field holds an array of more than two dimensions (the points of a shaped
    model) travels as a .npy file, its other fields as X-Flow-* headers."""

    method: str
    path: str
    decode: Callable[[httpx.Response], T]
    body: dict[str, Any] | None = None
    accept: str = "application/json"
    npy: str | None = None
    headers: dict[str, str] = field(init=False)
    content: bytes | None = field(init=False)

    def __post_init__(self) -> None:
        headers = {"Accept": self.accept}
        content = None
        body = self.body
        if body is not None and self.npy is not None and isinstance(body.get(self.npy), np.ndarray):
            buffer = io.BytesIO()
            np.save(buffer, body[self.npy], allow_pickle=False)
            content = buffer.getvalue()
            headers["Content-Type"] = NPY_MEDIA_TYPE
            for name, value in body.items():
                if name != self.npy:
                    header = "X-Flow-" + name.replace("_", "-").title()
                    headers[header] = json.dumps(value, separators=(",", ":"))
        elif body is not None:
            # Serialized here rather than by httpx so a non-finite number reaches the server, which
            # answers it with a 422 that names the field, instead of failing inside httpx.
            content = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "content", content)

    def with_info(self) -> _Request[tuple[T, AnswerInfo]]:
        """The same call, answering (value, AnswerInfo)."""
        decode = self.decode
        return _Request(
            self.method,
            self.path,
            lambda response: (decode(response), AnswerInfo.from_headers(response)),
            self.body,
            self.accept,
            self.npy,
        )


def _body(**fields: Any) -> dict[str, Any]:
    """The JSON body: fields left as None are omitted so the server's defaults apply."""
    return {name: value for name, value in fields.items() if value is not None}


def _points(value: ArrayLike | None, name: str) -> list[list[float]] | np.ndarray | None:
    """Points for the wire: (n, d) as a list of rows (a single point (d,) becomes (1, d)), or,
    for a shaped model, the (n, *shape) array itself (sent as .npy)."""
    if value is None:
        return None
    array = np.asarray(value)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim < 2:
        raise ValueError(
            f"{name} must be an (n, d) or (n, *shape) array of points, got shape {array.shape}"
        )
    if array.ndim > 2:
        return np.ascontiguousarray(array, dtype=np.float32)
    return array.astype(np.float64).tolist()


def _labels(value: Any) -> Any:
    """labels for the wire: one index or name, or a list (numpy arrays become Python lists)."""
    if value is None or isinstance(value, int | str):
        return value
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return [item.item() if isinstance(item, np.generic) else item for item in value]


def _condition(value: ArrayLike | None) -> Any:
    return None if value is None else np.asarray(value, dtype=np.float64).tolist()


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
        if states.ndim < 3 or states.shape[0] != times.shape[0]:
            raise FlowError(
                f"trajectory of shape {states.shape} does not match {times.shape[0]} times "
                f"(num_steps {steps}, stride {every})",
                response.status_code,
            )
        return times, states

    return decode


LOG_PROB_ARRAYS = ("log_prob", "log_p0", "divergence_integral", "divergence_stderr")


def _decode_log_prob(response: httpx.Response) -> dict[str, Any]:
    """The /log_prob answer: its arrays as numpy (latents float32, the rest float64) and its
    other fields (model, seed, num_probes, nfe, ...) as they came."""
    data = _json(response)
    out: dict[str, Any] = {
        key: value for key, value in data.items() if key not in (*LOG_PROB_ARRAYS, "latents")
    }
    for key in LOG_PROB_ARRAYS:
        value = data.get(key)
        out[key] = None if value is None else np.asarray(value, dtype=np.float64)
    latents = data.get("latents")
    out["latents"] = None if latents is None else np.asarray(latents, dtype=np.float32)
    return out


def _sample_request(
    path: str, decode: Callable[[httpx.Response], Any], x0: ArrayLike | None, **fields: Any
) -> _Request[Any]:
    body = _body(
        x0=_points(x0, "x0"),
        labels=_labels(fields.pop("labels", None)),
        condition=_condition(fields.pop("condition", None)),
        **fields,
    )
    return _Request("POST", path, decode, body, NPY_MEDIA_TYPE, npy="x0")


def _encode_request(x: ArrayLike, **fields: Any) -> _Request[np.ndarray]:
    body = _body(
        x=_points(x, "x"),
        labels=_labels(fields.pop("labels", None)),
        condition=_condition(fields.pop("condition", None)),
        **fields,
    )
    return _Request("POST", "/encode", _load_npy, body, NPY_MEDIA_TYPE, npy="x")


def _log_prob_request(x: ArrayLike, **fields: Any) -> _Request[dict[str, Any]]:
    body = _body(
        x=_points(x, "x"),
        labels=_labels(fields.pop("labels", None)),
        condition=_condition(fields.pop("condition", None)),
        **fields,
    )
    return _Request("POST", "/log_prob", _decode_log_prob, body, npy="x")


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
        labels: Labels | None = None,
        condition: ArrayLike | None = None,
        guidance_scale: float | None = None,
        timeout_s: float | None = None,
        with_info: bool = False,
    ) -> Any:
        """Samples x[K] of the flow: float32 (num_samples, *shape) ((n, dim) for flat models).

        `x0` (n, dim) or (n, *shape) fixes the start points. Conditional models: `labels` (one
        class index or name for all rows, or one per row), or `condition` (a vector, or one per
        row), and `guidance_scale`. With `with_info`: (samples, AnswerInfo), whose `seed`
        reproduces the answer.
        """
        request = _sample_request(
            "/sample",
            _load_npy,
            x0,
            model=model,
            num_samples=num_samples,
            num_steps=num_steps,
            seed=seed,
            solver=solver,
            labels=labels,
            condition=condition,
            guidance_scale=guidance_scale,
            timeout_s=timeout_s,
        )
        return self._call(request.with_info() if with_info else request)

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
        labels: Labels | None = None,
        condition: ArrayLike | None = None,
        guidance_scale: float | None = None,
        timeout_s: float | None = None,
        with_info: bool = False,
    ) -> Any:
        """The kept states: times float64 (T,) from 0 to 1, states float32
        (T, num_samples, *shape). With `with_info`: (times, states, AnswerInfo)."""
        request = _sample_request(
            "/trajectory",
            _trajectory_decoder(num_steps, stride),
            x0,
            model=model,
            num_samples=num_samples,
            num_steps=num_steps,
            seed=seed,
            stride=stride,
            solver=solver,
            labels=labels,
            condition=condition,
            guidance_scale=guidance_scale,
            timeout_s=timeout_s,
        )
        if not with_info:
            return self._call(request)
        (times, states), info = self._call(request.with_info())
        return times, states, info

    def encode(
        self,
        *,
        x: ArrayLike,
        model: str | None = None,
        num_steps: int | None = None,
        solver: str | None = None,
        labels: Labels | None = None,
        condition: ArrayLike | None = None,
        guidance_scale: float | None = None,
        timeout_s: float | None = None,
        with_info: bool = False,
    ) -> Any:
        """Latents: `x` (n, *shape) integrated back from t = 1 to t = 0, float32 of x's shape.
        With `with_info`: (latents, AnswerInfo)."""
        request = _encode_request(
            x,
            model=model,
            num_steps=num_steps,
            solver=solver,
            labels=labels,
            condition=condition,
            guidance_scale=guidance_scale,
            timeout_s=timeout_s,
        )
        return self._call(request.with_info() if with_info else request)

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
        labels: Labels | None = None,
        condition: ArrayLike | None = None,
        guidance_scale: float | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Model log-density of `x` (n, *shape), log p(x | c) for a conditional model.

        Returns "log_prob" (n,), "latents" (n, ...) float32, "log_p0" (n,),
        "divergence_integral" (n,) and "divergence_stderr" (n,) for "hutchinson" with
        num_probes > 1, else None; and the answer's other fields as sent ("model", "seed" of the
        Hutchinson probes, "num_probes", "divergence", "nfe", ...). `divergence` left out:
        "exact" up to the server's FLOW_MAX_EXACT_DIVERGENCE_DIM (16 by default), "hutchinson"
        above.
        """
        return self._call(
            _log_prob_request(
                x,
                model=model,
                num_steps=num_steps,
                solver=solver,
                divergence=divergence,
                num_probes=num_probes,
                seed=seed,
                labels=labels,
                condition=condition,
                guidance_scale=guidance_scale,
                timeout_s=timeout_s,
            )
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
        labels: Labels | None = None,
        condition: ArrayLike | None = None,
        guidance_scale: float | None = None,
        timeout_s: float | None = None,
        with_info: bool = False,
    ) -> Any:
        """See `FlowClient.sample`."""
        request = _sample_request(
            "/sample",
            _load_npy,
            x0,
            model=model,
            num_samples=num_samples,
            num_steps=num_steps,
            seed=seed,
            solver=solver,
            labels=labels,
            condition=condition,
            guidance_scale=guidance_scale,
            timeout_s=timeout_s,
        )
        return await self._call(request.with_info() if with_info else request)

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
        labels: Labels | None = None,
        condition: ArrayLike | None = None,
        guidance_scale: float | None = None,
        timeout_s: float | None = None,
        with_info: bool = False,
    ) -> Any:
        """See `FlowClient.trajectory`."""
        request = _sample_request(
            "/trajectory",
            _trajectory_decoder(num_steps, stride),
            x0,
            model=model,
            num_samples=num_samples,
            num_steps=num_steps,
            seed=seed,
            stride=stride,
            solver=solver,
            labels=labels,
            condition=condition,
            guidance_scale=guidance_scale,
            timeout_s=timeout_s,
        )
        if not with_info:
            return await self._call(request)
        (times, states), info = await self._call(request.with_info())
        return times, states, info

    async def encode(
        self,
        *,
        x: ArrayLike,
        model: str | None = None,
        num_steps: int | None = None,
        solver: str | None = None,
        labels: Labels | None = None,
        condition: ArrayLike | None = None,
        guidance_scale: float | None = None,
        timeout_s: float | None = None,
        with_info: bool = False,
    ) -> Any:
        """See `FlowClient.encode`."""
        request = _encode_request(
            x,
            model=model,
            num_steps=num_steps,
            solver=solver,
            labels=labels,
            condition=condition,
            guidance_scale=guidance_scale,
            timeout_s=timeout_s,
        )
        return await self._call(request.with_info() if with_info else request)

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
        labels: Labels | None = None,
        condition: ArrayLike | None = None,
        guidance_scale: float | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """See `FlowClient.log_prob`."""
        return await self._call(
            _log_prob_request(
                x,
                model=model,
                num_steps=num_steps,
                solver=solver,
                divergence=divergence,
                num_probes=num_probes,
                seed=seed,
                labels=labels,
                condition=condition,
                guidance_scale=guidance_scale,
                timeout_s=timeout_s,
            )
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
