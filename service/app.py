"""The FastAPI application: settings in, lifespan loads the models, routes serve them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import AccessLog, BearerAuth, BodyLimit
from service.registry import Registry
from service.routes import router
from service.settings import Settings, get_settings

log = logging.getLogger("flowserve")

DESCRIPTION = """\
Sampling service for flow-matching models: batched ODE integration of a TorchScript velocity
field v(t, x). `POST /sample` and `POST /trajectory` answer JSON, or a float32 `.npy` file with
`Accept: application/x-npy`. Errors are `{"detail": "..."}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = Registry(settings, metrics)
        app.state.registry = registry
        # Load in a worker thread: /healthz answers at once, /readyz turns 200 when warm.
        loading = asyncio.create_task(asyncio.to_thread(registry.load))
        loading.add_done_callback(_report_failure)
        try:
            yield
        finally:
            registry.closed = True  # a load still running stops before its next model
            with contextlib.suppress(Exception):
                await loading
            registry.close()

    app = FastAPI(
        title="flowserve",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # Clients and curl often omit Content-Type; the body is JSON whatever they say.
        strict_content_type=False,
    )
    app.state.settings = settings
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(BearerAuth, keys=settings.api_keys())
    endpoints = frozenset(route.path for route in router.routes) | {"/docs", "/openapi.json"}
    app.add_middleware(AccessLog, metrics=metrics, endpoints=endpoints)
    return app


def _report_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("model loading failed: %s", task.exception())
