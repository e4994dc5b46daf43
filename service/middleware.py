"""ASGI middleware: one log line and the metrics per request, bearer-key auth, body size limit,
.npy request bodies.

Plain ASGI (no BaseHTTPMiddleware) so the routes keep the real `receive` and can see a client
disconnect while their work runs.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import time

import numpy as np
import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.encoding import NPY
from service.metrics import Metrics
from service.schemas import NPY_POINTS, npy_points

access_log = logging.getLogger("flowserve.access")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


async def _send_error(send: Send, status: int, detail: str, headers: dict[str, str] | None = None):
    body = orjson.dumps({"detail": detail})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def replaying(message: Message, receive: Receive) -> Receive:
    """`receive` for the app behind a middleware that has read the body: `message` first, then
    what `receive` gives (the disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return message
        return await receive()

    return replay


def _whole(body: bytes) -> Message:
    return {"type": "http.request", "body": body, "more_body": False}


class AccessLog:
    """Counts, times and logs every HTTP request as one JSON line."""

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            duration = time.perf_counter() - start
            path = scope["path"]
            # The route's template (/models/{name}) keeps the metric's label set bounded.
            template = getattr(scope.get("route"), "path", path)
            endpoint = template if template in self.endpoints else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(duration)
            if access_log.isEnabledFor(logging.INFO):
                self._log(scope, path, status, duration)

    @staticmethod
    def _log(scope: Scope, path: str, status: int, duration: float) -> None:
        fields = scope.get("state", {}).get("log_fields", {})
        line = {
            "method": scope["method"],
            "path": path,
            **fields,
            "status": status,
            "duration_ms": round(duration * 1000, 2),
        }
        try:
            text = orjson.dumps(line).decode()
        except TypeError:  # an integer past 64 bits (a huge num_samples): json copes
            text = json.dumps(line, separators=(",", ":"))
        access_log.info(text)


class BearerAuth:
    """With keys configured, every path but health and readiness (and `open_paths` and paths
    under `open_prefixes`) needs `Authorization: Bearer`."""

    def __init__(
        self,
        app: ASGIApp,
        keys: list[bytes],
        open_paths: frozenset[str] = frozenset(),
        open_prefixes: tuple[str, ...] = (),
    ):
        self.app = app
        self.keys = keys
        self.open_paths = OPEN_PATHS | open_paths
        self.open_prefixes = open_prefixes

    def _allowed(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        # Compare against every key so the time taken does not tell which one nearly matched.
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or not self.keys
            or path in self.open_paths
            or path.startswith(self.open_prefixes)
        ):
            await self.app(scope, receive, send)
            return
        if not self._allowed(scope):
            await _send_error(
                send,
                401,
                "authorization: a valid 'Authorization: Bearer <key>' header is required",
                {"WWW-Authenticate": 'Bearer realm="flowserve"'},
            )
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over `limit` bytes, decided from Content-Length or while it streams in,
    never after buffering more than the limit."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    def _refuse(self, send: Send, size: str):
        return _send_error(
            send, 413, f"body: {size} is over the limit of {self.limit} bytes (FLOW_MAX_BODY_BYTES)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send, f"{int(length)} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send, f"more than {self.limit} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        await self.app(scope, replaying(_whole(body), receive), send)


NPY_FIELDS = {
    "/sample": "x0",
    "/trajectory": "x0",
    "/encode": "x",
    "/log_prob": "x",
    "/velocity": "x",
}
"""The field an .npy body fills, by path."""
HEADER_PREFIX = b"x-flow-"


class NpyBody:
    """POST bodies sent as `.npy` (`Content-Type: application/x-npy`): the array is the points
    field (`x0` of /sample and /trajectory, `x` of /encode, /log_prob and /velocity), of shape
    (n, dim) or (n, *shape), and every other field comes as an `X-Flow-<Field>` header whose
    value is JSON or a bare string (`X-Flow-Num-Steps: 8`, `X-Flow-Solver: rk4`,
    `X-Flow-Labels: [0, 1]`).

    The request then goes on as JSON holding those fields; the array itself skips the float-by-
    float JSON validation (it is checked here: numbers, finite) and reaches the route decoded.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in NPY_FIELDS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        media_type = headers.get(b"content-type", b"").split(b";")[0].strip().decode("latin-1")
        if media_type != NPY:
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        name = NPY_FIELDS[scope["path"]]
        try:
            array = _read_points(b"".join(chunks), name)
            fields = _header_fields(scope["headers"])
        except ValueError as exc:
            await _send_error(send, 422, str(exc))
            return
        fields[name] = NPY_POINTS
        body = orjson.dumps(fields)

        rewritten = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")
        ]
        rewritten += [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
        ]
        token = npy_points.set(array)
        try:
            await self.app({**scope, "headers": rewritten}, replaying(_whole(body), receive), send)
        finally:
            npy_points.reset(token)


def _read_points(data: bytes, name: str) -> np.ndarray:
    """(n, dim) float32 rows of a .npy file of shape (n, ...); ValueError naming `name`."""
    if not data.startswith(b"\x93NUMPY"):
        raise ValueError(f"{name}: the body is not a .npy file (Content-Type: {NPY})")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{name}: the body is not a readable .npy file ({exc})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise ValueError(f"{name}: the .npy array must hold numbers, got {array.dtype}")
    if array.ndim < 2 or array.shape[0] == 0 or array.size == 0:
        raise ValueError(
            f"{name}: the .npy array must have shape (n, dim) or (n, *shape), got {array.shape}"
        )
    rows = np.ascontiguousarray(array.reshape(array.shape[0], -1), dtype=np.float32)
    if not np.isfinite(rows).all():
        row = int(np.argmin(np.isfinite(rows).all(axis=1)))
        raise ValueError(f"{name}[{row}]: contains NaN or infinity (or a number past float32)")
    return rows


def _header_fields(headers: list[tuple[bytes, bytes]]) -> dict[str, object]:
    """`X-Flow-Num-Steps: 8` -> {"num_steps": 8}: values are JSON where they parse, else text."""
    fields: dict[str, object] = {}
    for key, raw in headers:
        if not key.startswith(HEADER_PREFIX):
            continue
        field = key[len(HEADER_PREFIX) :].decode("latin-1").replace("-", "_")
        text = raw.decode("latin-1")
        try:
            fields[field] = json.loads(text)
        except ValueError:
            fields[field] = text
    return fields
