"""The FastAPI application: settings in, lifespan loads the models, routes serve them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import playground
from service.encoding import json_response
from service.errors import (
    ServiceError,
    Unavailable,
    describe_validation,
    one_line,
    status_of,
)
from service.metrics import Metrics
from service.middleware import OPEN_PATHS, AccessLog, BearerAuth, BodyLimit, NpyBody
from service.registry import Registry
from service.remote import RemoteRegistry
from service.routes import DirectPosts, router
from service.settings import Settings, get_settings

log = logging.getLogger("flowserve")

DESCRIPTION = """\
Sampling service for flow-matching models: batched ODE integration of a TorchScript velocity
field v(t, x), or v(t, x, c) with class labels or vector conditions and classifier-free guidance.

- `POST /sample`: samples from the model; `POST /trajectory`: the paths, every stride-th state.
- `POST /encode`: data back to noise; `POST /log_prob`: log-densities (continuous change of
  variables).
- `GET /models`, `GET /models/{name}`: manifests; `GET /healthz`, `GET /readyz`: liveness and
  readiness; `GET /metrics`: Prometheus text.

POST answers are JSON, or a float32 `.npy` file with `Accept: application/x-npy` (`/sample` of an
image model: a PNG grid with `Accept: image/png`); points may be sent as a `.npy` body. Errors
are `{"detail": "..."}`. With `FLOW_API_KEY` set, every endpoint but health, readiness and these
docs needs `Authorization: Bearer <key>`: use Authorize.
"""
DOCS_ASSETS = "/docs/static"
"""Swagger UI's script and style, served from the fastapi-offline package: the docs page works on
a machine without internet."""
OPEN_DOCS = frozenset({"/docs", "/openapi.json", "/docs/oauth2-redirect"})


def create_app(
    settings: Settings | None = None,
    *,
    on_fatal: Callable[[str], None] | None = None,
    registry: Registry | None = None,
) -> FastAPI:
    """The app. `on_fatal(reason)` is called when the service can no longer serve (model loading
    crashed, or an engine keeps failing); `python -m service` then exits 1.

    Without `registry` the app's start-up loads the models in the background (/healthz answers
    at once, /readyz turns 200 when they are warm); with one (`service.registry.load_ready`) it
    serves those models, already warm, and closes them when it stops."""
    settings = settings or get_settings()
    metrics = registry.metrics if registry is not None else Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if registry is not None:
            registry.on_fatal = registry.on_fatal or on_fatal
            app.state.registry = registry
            loading = asyncio.create_task(asyncio.sleep(0))
        elif settings.engine_address:  # a front of the engine process
            remote = RemoteRegistry(settings, metrics, on_fatal=on_fatal)
            app.state.registry = remote
            loading = asyncio.create_task(remote.connect())
        else:
            loaded = Registry(settings, metrics, on_fatal=on_fatal)
            app.state.registry = loaded
            # Load in a worker thread: /healthz answers at once, /readyz turns 200 when warm.
            loading = asyncio.create_task(asyncio.to_thread(loaded.load))
        loading.add_done_callback(lambda task: _report_failure(task, app.state.registry))
        watching = asyncio.create_task(_watch_after(loading, app.state.registry))
        try:
            yield
        finally:
            app.state.registry.closed = True  # a load still running stops before its next model
            watching.cancel()
            with contextlib.suppress(BaseException):
                await watching
            with contextlib.suppress(Exception):
                await loading
            if settings.engine_address:
                await app.state.registry.close()
            else:
                app.state.registry.close()

    options = {
        "title": "flowserve",
        "version": "0.1.0",
        "description": DESCRIPTION,
        "lifespan": lifespan,
        # Clients and curl often omit Content-Type; the body is JSON whatever they say.
        "strict_content_type": False,
        "redoc_url": None,
    }
    if settings.docs:
        app = FastAPIOffline(static_url=DOCS_ASSETS, **options)
    else:
        app = FastAPI(**options, docs_url=None, openapi_url=None)
    app.state.settings = settings
    app.include_router(router)
    open_paths = OPEN_DOCS
    if settings.playground:
        app.include_router(playground.router)
        open_paths = open_paths | playground.OPEN_PATHS
    keys = settings.api_keys()
    if keys:
        _declare_bearer_auth(app)
    install_error_handlers(app, settings.retry_after_s)
    app.add_middleware(DirectPosts)  # innermost: after auth, the body limit and .npy bodies
    app.add_middleware(NpyBody)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    # The docs are open (a browser cannot send a bearer key to load a page); the calls made from
    # them carry the key given to Authorize.
    # So is the playground page; the calls it makes carry the key typed into it.
    app.add_middleware(
        BearerAuth, keys=keys, open_paths=open_paths, open_prefixes=(DOCS_ASSETS + "/",)
    )
    endpoints = frozenset(route.path for route in router.routes) | {"/docs", "/openapi.json"}
    if settings.playground:
        endpoints |= playground.OPEN_PATHS
    app.add_middleware(AccessLog, metrics=metrics, endpoints=endpoints)
    return app


def _declare_bearer_auth(app: FastAPI) -> None:
    """The OpenAPI document says which operations need `Authorization: Bearer`, so /docs offers
    Authorize and sends the key."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["bearer"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "One of the keys of FLOW_API_KEY.",
            }
            for path, operations in schema["paths"].items():
                if path in OPEN_PATHS:
                    continue
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


async def _watch_after(loading: asyncio.Task, registry: Registry | RemoteRegistry) -> None:
    await asyncio.shield(loading)  # shielded: stopping the watchdog must not stop a load
    await registry.watch()


def _report_failure(task: asyncio.Task, registry: Registry | RemoteRegistry) -> None:
    """Loading runs every model check inside each model's refusal handling, so an error here is
    the service's own: it cannot serve, and says so."""
    if task.cancelled() or task.exception() is None:
        return
    registry.fatal = f"model loading failed: {one_line(task.exception())}"
    log.error("%s", registry.fatal)
    if registry.on_fatal is not None:
        registry.on_fatal(registry.fatal)


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Every error answers `{"detail": "..."}`: domain errors with their status from
    `service.errors.STATUS` (503s with Retry-After), validation errors as one 422 line."""
    retry = {"Retry-After": str(retry_after_s)}

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> Response:
        headers = retry if isinstance(exc, Unavailable) else None
        return json_response({"detail": exc.detail}, headers, status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> Response:
        return json_response({"detail": describe_validation(list(exc.errors()))}, status=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI answers 400 for a body that is not text at all; like any malformed body: 422.
            return json_response({"detail": "body: not valid JSON (not UTF-8 text)"}, status=422)
        return json_response({"detail": str(exc.detail)}, exc.headers, exc.status_code)
