"""HTTP routes: validate, hand the work to `service.sampling`, encode. Nothing heavier here."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service import sampling
from service.encoding import (
    NPY,
    PNG,
    json_response,
    npy_response,
    png_grid,
    wants_npy,
    wants_png,
)
from service.errors import ModelNotFound, NotAcceptable, NotReady, ServiceError
from service.metrics import shared as shared_metrics
from service.middleware import replaying
from service.registry import Registry
from service.remote import RemoteRegistry
from service.schemas import (
    EncodeRequest,
    EncodeResponse,
    ErrorResponse,
    HealthResponse,
    LogProbRequest,
    LogProbResponse,
    ModelsResponse,
    SampleRequest,
    SampleResponse,
    TrajectoryRequest,
    TrajectoryResponse,
    VelocityRequest,
    VelocityResponse,
)
from service.settings import Settings


# Async so FastAPI calls them inline rather than through its thread pool.
async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


RegistryDep = Annotated[Registry | RemoteRegistry, Depends(get_registry)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
AcceptHeader = Annotated[
    str | None,
    Header(
        description=f"`{NPY}` for a .npy answer; on /sample, `{PNG}` for a picture grid of an "
        "image model's samples."
    ),
]

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        401: "Missing or wrong bearer key (when FLOW_API_KEY is set).",
        404: "Unknown model.",
        406: "Accept: image/png for a model whose samples are not images.",
        413: "Over a limit: rows, steps, trajectory size, work or body size.",
        422: "Malformed or invalid body.",
        500: "The model produced non-finite values.",
        503: "Queue full or not ready; see Retry-After.",
        504: "The request's deadline passed.",
    }.items()
}


def _npy_doc(shape: str, png: bool = False) -> dict[int | str, dict[str, Any]]:
    binary = {"schema": {"type": "string", "format": "binary"}}
    content = {NPY: binary, **({PNG: binary} if png else {})}
    return {200: {"content": content, "description": shape}}


# A POST body may instead be a .npy file of the points (service.middleware.NpyBody).
NPY_BODY = {
    "requestBody": {
        "content": {
            NPY: {
                "schema": {"type": "string", "format": "binary"},
                "description": "The points (x0 or x) as a .npy array (n, dim) or (n, *shape); "
                "the other fields as X-Flow-<Field> headers (JSON values or bare strings).",
            }
        }
    }
}


router = APIRouter()

Verb = Callable[..., Awaitable[sampling.Answer]]


INLINE_ENCODE_BYTES = 64 * 1024
"""Answers up to this size are encoded on the event loop: microseconds, less than a thread hop."""


async def _answer(
    verb: Verb,
    req: SampleRequest | EncodeRequest | VelocityRequest,
    request: Request,
    registry: Registry,
    settings: Settings,
    accept: str | None,
) -> Response:
    """The path every POST takes: find the model, note the log fields, do the work, encode."""
    served = registry.get(req.model)
    request.state.log_fields = {
        "model": served.model.name,
        "num_samples": req.rows,
        "num_steps": getattr(req, "num_steps", None),  # /velocity has neither
        "solver": getattr(req, "solver", None),
    }
    return await _encode(await verb(served, req, settings, _disconnected(request)), accept)


def _disconnected(request: Request) -> sampling.Disconnected:
    async def wait() -> None:
        # The body has been read: the next message the server sends is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


FRONT = str(os.getpid())
"""This HTTP front's process id: with several fronts (FLOW_HTTP_WORKERS), which one answered."""


def _headers(meta: dict[str, Any]) -> dict[str, str]:
    """`X-Flow-*` headers of an answer's scalar fields: {"num_steps": 8} -> X-Flow-Num-Steps: 8;
    and X-Flow-Front, the process that answered."""
    headers = {
        "X-Flow-" + key.replace("_", "-").title(): str(value)
        for key, value in meta.items()
        if value is not None
    }
    headers["X-Flow-Front"] = FRONT
    return headers


async def _encode(answer: sampling.Answer, accept: str | None) -> Response:
    headers = _headers(answer.meta)
    if wants_png(accept) and not wants_npy(accept):
        if answer.images is None:
            model = answer.meta.get("model")
            raise NotAcceptable(
                f"accept: {PNG} is offered by POST /sample for models whose samples are images "
                f"(shape (H, W), (1, H, W) or (3, H, W)); this answer of model {model} is not one"
            )
        content = await run_in_threadpool(png_grid, answer.images, answer.data_range)
        return Response(content, media_type=PNG, headers=headers)
    if wants_npy(accept) and answer.array is not None:
        encode, argument = npy_response, answer.array
    else:
        encode, argument = json_response, answer.body
    if answer.nbytes <= INLINE_ENCODE_BYTES:
        return encode(argument, headers)
    return await run_in_threadpool(encode, argument, headers)


@router.post(
    "/sample",
    response_model=SampleResponse,
    responses={
        **ERRORS,
        **_npy_doc("float32 (num_samples, *shape); PNG: a grid of image samples", png=True),
    },
    openapi_extra=NPY_BODY,
    summary="Draw samples: integrate start points from t = 0 to t = 1.",
)
async def sample(
    req: SampleRequest,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    accept: AcceptHeader = None,
) -> Response:
    return await _answer(sampling.sample, req, request, registry, settings, accept)


@router.post(
    "/trajectory",
    response_model=TrajectoryResponse,
    responses={**ERRORS, **_npy_doc("float32 (len(times), num_samples, *shape)")},
    openapi_extra=NPY_BODY,
    summary="Sample and keep every stride-th state of the paths.",
)
async def trajectory(
    req: TrajectoryRequest,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    accept: AcceptHeader = None,
) -> Response:
    return await _answer(sampling.sample, req, request, registry, settings, accept)


@router.post(
    "/encode",
    response_model=EncodeResponse,
    responses={**ERRORS, **_npy_doc("float32 (n, *shape): the latents")},
    openapi_extra=NPY_BODY,
    summary="Map data points back to the source: integrate from t = 1 to t = 0.",
)
async def encode(
    req: EncodeRequest,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    accept: AcceptHeader = None,
) -> Response:
    return await _answer(sampling.encode, req, request, registry, settings, accept)


@router.post(
    "/velocity",
    response_model=VelocityResponse,
    responses={**ERRORS, **_npy_doc("float32 (n, *shape): v(t, x) at each point")},
    openapi_extra=NPY_BODY,
    summary="The velocity field v(t, x) at given points (v_w with classifier-free guidance).",
)
async def velocity(
    req: VelocityRequest,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    accept: AcceptHeader = None,
) -> Response:
    return await _answer(sampling.velocity, req, request, registry, settings, accept)


@router.post(
    "/log_prob",
    response_model=LogProbResponse,
    responses=ERRORS,
    openapi_extra=NPY_BODY,
    summary="Log-density of data points under the model (continuous change of variables).",
)
async def log_prob(
    req: LogProbRequest, request: Request, registry: RegistryDep, settings: SettingsDep
) -> Response:
    return await _answer(sampling.log_prob, req, request, registry, settings, None)


@router.get("/models", response_model=ModelsResponse, responses={401: ERRORS[401]})
async def list_models(registry: RegistryDep) -> Response:
    manifests = [registry.served[name].model.manifest for name in sorted(registry.served)]
    body: dict[str, Any] = {"models": manifests}
    if registry.refused:
        body["refused"] = [
            {"name": name, "reason": reason} for name, reason in sorted(registry.refused.items())
        ]
    return json_response(body)


@router.get(
    "/models/{name}",
    response_model=dict[str, Any],
    responses={401: ERRORS[401], 404: ERRORS[404], 503: ERRORS[503]},
)
async def get_model(name: str, registry: RegistryDep) -> Response:
    if not registry.ready:
        registry.get(name)  # answers 503 while loading
    served = registry.served.get(name)
    if served is None:
        raise ModelNotFound(registry.unknown(name))
    return json_response(served.model.manifest)


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", response_model=HealthResponse, responses={503: ERRORS[503]})
async def readyz(registry: RegistryDep) -> Response:
    reason = registry.not_ready()
    if reason is not None:
        raise NotReady(reason)  # 503 with the configured Retry-After
    body: dict[str, Any] = {"status": "ready", "models": sorted(registry.served)}
    if registry.refused:
        body["refused"] = dict(sorted(registry.refused.items()))
    headers = {"X-Flow-Front": FRONT}
    if isinstance(registry, RemoteRegistry):
        headers["X-Flow-Engine-Pid"] = str(registry.status.get("pid"))
    return json_response(body, headers)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text format."}, 401: ERRORS[401]},
)
async def metrics(registry: RegistryDep) -> Response:
    registry.refresh_gauges()
    text = registry.metrics.render()
    if isinstance(registry, RemoteRegistry) and registry.ready and not shared_metrics():
        text += await registry.engine_metrics()
    headers = {"X-Flow-Front": FRONT}
    return Response(text, media_type="text/plain; version=0.0.4", headers=headers)


POSTS: dict[str, tuple[Verb, type[BaseModel], bool]] = {
    "/sample": (sampling.sample, SampleRequest, True),
    "/trajectory": (sampling.sample, TrajectoryRequest, True),
    "/encode": (sampling.encode, EncodeRequest, True),
    "/velocity": (sampling.velocity, VelocityRequest, True),
    "/log_prob": (sampling.log_prob, LogProbRequest, False),
}
"""The POST endpoints `DirectPosts` answers: the work, the body's model, whether Accept counts."""


class DirectPosts:
    """The POST endpoints without FastAPI's per-request machinery (dependency solving, a second
    body parse, an exit stack per request): the body is parsed once (orjson) and validated by
    its model as FastAPI would (`model_validate`, the same python-mode rules), then answered by
    the same `_answer` and, for a domain error, the app's own exception handler. A body that does
    not parse or validate is handed to FastAPI untouched, so every 422 is the one FastAPI gives.
    The routes above stay what /docs describes and what the rest of the app sees."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        post = POSTS.get(scope["path"]) if scope["type"] == "http" else None
        if post is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        message = await receive()
        if message["type"] != "http.request":
            return  # the client left before sending its body
        if message.get("more_body", False):  # not one piece (BodyLimit gives it whole)
            await self.app(scope, replaying(message, receive), send)
            return
        verb, model, with_accept = post
        try:
            req = model.model_validate(orjson.loads(message.get("body", b"")))
        except (orjson.JSONDecodeError, ValidationError):
            await self.app(scope, replaying(message, receive), send)
            return
        request = Request(scope, receive)
        app = scope["app"]
        accept = Headers(scope=scope).get("accept") if with_accept else None
        try:
            response = await _answer(
                verb, req, request, app.state.registry, app.state.settings, accept
            )
        except ServiceError as exc:
            response = await app.exception_handlers[ServiceError](request, exc)
        await response(scope, receive, send)
