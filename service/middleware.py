"""ASGI middleware: one log line and the metrics per request, bearer-key auth, body size limit.

Plain ASGI (no BaseHTTPMiddleware) so the routes keep the real `receive` and can see a client
disconnect while their work runs.
"""

from __future__ import annotations

import hmac
import json
import logging
import time

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

access_log = logging.getLogger("flowserve.access")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


async def _send_error(send: Send, status: int, detail: str, headers: dict[str, str] | None = None):
    body = orjson.dumps({"detail": detail})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


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
    """With keys configured, every path but health and readiness needs `Authorization: Bearer`."""

    def __init__(self, app: ASGIApp, keys: list[bytes]):
        self.app = app
        self.keys = keys

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
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
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
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
