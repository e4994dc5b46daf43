"""flowserve on Ray Serve: the same app, one engine per replica, replicas across a Ray cluster.

    serve run deploy/ray/serve.yaml                 # or: serve deploy, or KubeRay's RayService

The Serve config names `service.ray_serve:build` with the service's settings as `args`
(`models_dir: /opt/flowserve/models`, ...; field names of `service.settings.Settings`, every
other setting from the replica's `FLOW_*` environment). Each replica builds its app from those
settings with `create_app`, so nothing but a dict of settings is pickled, and:

- starts serving only once every model is loaded, checked and warm (`load_ready`): Serve routes
  nothing to a replica before its constructor returns, and a replica whose models dir is empty
  or holds a refused model fails its start with the one line /readyz would give;
- fails `check_health` once its engines cannot serve (an engine that keeps dying, a crashed
  watchdog), so Serve replaces the replica; an engine that dies once is replaced in place by the
  watchdog, faster than a new replica could start;
- sets up what `python -m service` sets up for its process: logging for flowserve's loggers (the
  access log included; Ray keeps a replica's stderr in its worker logs), glibc's freed-memory
  policy, torch's thread count.

What Serve itself answers (a replica lost mid-request, no replica running, its own
backpressure) comes from the proxies, outside any replica: `proxy_middlewares` keeps those in the
contract's shape, `{"detail": ...}` with 503 and Retry-After where a retry will succeed. The proxy
loads it when Ray's processes start with
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=service.ray_serve:proxy_middlewares`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import orjson
from fastapi import FastAPI
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.app import create_app
from service.errors import describe_validation
from service.process import keep_freed_memory
from service.registry import Registry, load_ready
from service.settings import Settings

log = logging.getLogger("flowserve")

RETRY_AFTER_S = 1
"""Retry-After of the 503s the proxy answers for Serve (a lost replica, no replica running)."""


class BadServeConfig(ValueError):
    """The settings in a Serve config's `args` are not valid: one line naming the field."""


def settings_from(args: dict[str, Any]) -> Settings:
    """`Settings` from a Serve config's `args` (over the process's FLOW_* environment)."""
    try:
        return Settings(**args)
    except ValidationError as exc:
        raise BadServeConfig(f"flowserve settings: {describe_validation(exc.errors())}") from None


@serve.deployment(
    # Defaults for a deployment built in code; deploy/ray/serve.yaml sets each of them.
    max_ongoing_requests=256,
    health_check_period_s=5,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class FlowService:
    """One replica: the service's app over its own warm engines."""

    def __init__(self, args: dict[str, Any]):
        self.settings = settings_from(args)
        self.registry: Registry | None = None
        self.fatal: str | None = None
        set_up_process(self.settings)

    async def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve routes traffic here only after this returns: load and warm first. A failure
        # raises ModelsNotReady (one line), and the replica never starts.
        self.registry = await load_ready(self.settings, on_fatal=self._give_up)
        app = create_app(self.settings, registry=self.registry)
        app.add_middleware(PicklableBodies)
        log.info("replica %s serving %s", os.getpid(), ", ".join(sorted(self.registry.served)))
        return app

    def _give_up(self, reason: str) -> None:
        self.fatal = reason

    def check_health(self) -> None:
        """Serve replaces the replica when this raises."""
        reason = self.fatal or (replica_fault(self.registry) if self.registry else None)
        if reason is not None:
            raise RuntimeError(f"flowserve replica cannot serve: {reason}")


def replica_fault(registry: Registry) -> str | None:
    """Why a replica's models can no longer serve, or None: the registry gave up (an engine that
    kept failing), or the watchdog that replaces dead engines is not running."""
    if registry.fatal is not None:
        return registry.fatal
    if not registry.watching:
        dead = [name for name, one in sorted(registry.served.items()) if one.engine.failure]
        also = f" (dead engines: {', '.join(dead)})" if dead else ""
        return f"the engine watchdog is not running{also}"
    return None


def set_up_process(settings: Settings) -> None:
    """What `python -m service` does for its own process, in a replica's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s %(name)s [replica {os.getpid()}] %(message)s")
    )
    root = logging.getLogger("flowserve")
    root.handlers = [handler]  # once per replica process, however often the class is built
    root.setLevel(settings.log_level.upper())
    root.propagate = False  # Ray's own handlers would print each line again
    if settings.keep_freed_memory:
        keep_freed_memory()


def build(args: dict[str, Any]) -> Application:
    """The application of a Serve config: `import_path: service.ray_serve:build`, `args`: the
    service's settings. Checked here, at deploy time, so that a bad setting fails the deploy
    with one line instead of every replica."""
    settings_from(args)
    return FlowService.bind(args)


class PicklableBodies:
    """A replica sends every response message to the proxy pickled; the app's `.npy` answers
    are memoryviews over one buffer (no copy under uvicorn), which pickle refuses: bytes here."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_bytes(message: Message) -> None:
            body = message.get("body")
            if isinstance(body, memoryview):
                message = {**message, "body": body.tobytes()}
            await send(message)

        await self.app(scope, receive, send_bytes)


class ContractErrors:
    """In Serve's proxy: its own error answers (plain text) become `{"detail": ...}`, with 503 and
    Retry-After where a retry will succeed; a request that failed before any answer (its replica
    was lost) gets 503 + Retry-After, which `FlowClient` retries. The app's answers pass as they
    are (its errors are JSON already)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started: Message | None = None  # held while the answer may be Serve's own error
        rewriting = False
        answered = False

        async def relay(message: Message) -> None:
            nonlocal started, rewriting, answered
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                kind = headers.get(b"content-type", b"")
                if message["status"] >= 400 and not kind.startswith(b"application/json"):
                    started, rewriting = message, True
                    return
                answered = True
                await send(message)
            elif rewriting and message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    text = b"".join(chunks).decode("utf-8", "replace").strip()
                    answered = True
                    await _send_detail(send, started["status"], text or "error", started)
            else:
                await send(message)

        chunks: list[bytes] = []
        try:
            await self.app(scope, receive, relay)
        finally:
            if not answered:
                # Serve gave up on the request without answering (its replica died): the
                # request may be sent again.
                await _send_detail(
                    send, 503, "the replica serving this request was lost; retry", None
                )


async def _send_detail(send: Send, status: int, detail: str, start: Message | None) -> None:
    headers = [(b"content-type", b"application/json")]
    old = dict((start or {}).get("headers") or [])
    if status == 503:
        headers.append((b"retry-after", old.get(b"retry-after", str(RETRY_AFTER_S).encode())))
    for name in (b"x-request-id",):
        if name in old:
            headers.append((name, old[name]))
    body = orjson.dumps({"detail": detail})
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Middleware]:
    """RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=service.ray_serve:proxy_middlewares."""
    return [Middleware(ContractErrors)]
