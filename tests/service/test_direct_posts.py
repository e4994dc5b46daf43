"""DirectPosts: the POST endpoints answered without FastAPI's per-request machinery must answer
exactly as the FastAPI routes do, and hand every body they do not accept to FastAPI untouched."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import serving
from fastapi import FastAPI
from fastapi.middleware.asyncexitstack import AsyncExitStackMiddleware
from fastapi.testclient import TestClient
from starlette.middleware.exceptions import ExceptionMiddleware

from service.routes import POSTS, DirectPosts, router

X = [[0.5, -1.0], [2.0, 0.25], [-3.0, 1.5]]
VALID = {
    "/sample": {"model": "tiny", "num_samples": 3, "num_steps": 4, "seed": 11},
    "/trajectory": {"model": "tiny", "num_samples": 2, "num_steps": 4, "stride": 2, "seed": 5},
    "/encode": {"model": "tiny", "x": X, "num_steps": 4},
    "/velocity": {"model": "tiny", "t": 0.25, "x": X},
    "/log_prob": {"model": "tiny", "x": X, "num_steps": 4},
}
NPY = "application/x-npy"


@pytest.fixture(scope="module")
def client(tiny_models_dir: Path) -> Iterator[TestClient]:
    with serving(tiny_models_dir) as client:
        yield client


def fastapi_only(app: FastAPI) -> ExceptionMiddleware:
    """What FastAPI answers on its own: its routes behind the app's exception handlers (the
    innermost part of the app's own middleware stack)."""
    routes = AsyncExitStackMiddleware(app.router)
    return ExceptionMiddleware(routes, handlers=app.exception_handlers)


class Inner:
    """The app behind DirectPosts in this test: records what reaches it, answers 299."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"inner"})


def call(
    asgi: Any, app: FastAPI, path: str, body: bytes, accept: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """POST `body` to `path` of the ASGI callable `asgi` (its scope's app: `app`)."""
    headers = [(b"content-type", b"application/json")]
    if accept is not None:
        headers.append((b"accept", accept.encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "app": app,
        "state": {},
    }

    async def run() -> tuple[int, dict[str, str], bytes]:
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        gone = asyncio.Event()  # the client never leaves here

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await asgi(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        found = {k.decode(): v.decode() for k, v in start["headers"]}
        return start["status"], found, answer

    return asyncio.run(run())


def test_every_post_route_is_answered_directly() -> None:
    posts = {route.path for route in router.routes if "POST" in route.methods}
    assert set(POSTS) == posts == set(VALID)


@pytest.mark.parametrize("accept", [None, NPY], ids=["json", "npy"])
@pytest.mark.parametrize("path", sorted(VALID))
def test_a_valid_body_gets_the_routes_answer_without_reaching_fastapi(
    client: TestClient, path: str, accept: str | None
) -> None:
    app = client.app
    inner = Inner()
    body = orjson.dumps(VALID[path])
    status, headers, answer = call(DirectPosts(inner), app, path, body, accept)
    assert inner.bodies == []
    route_status, route_headers, route_answer = call(fastapi_only(app), app, path, body, accept)
    assert (status, answer) == (route_status, route_answer)
    assert status == 200
    assert headers == route_headers


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{not json",
        b"[1, 2]",
        b'{"model": "tiny", "num_samples": 0, "num_steps": 4}',
        b'{"model": "tiny", "num_samples": 2, "num_steps": 4, "colour": "red"}',
        b'{"model": "tiny", "num_samples": 2.5, "num_steps": 4}',
        b'{"model": "tiny", "num_samples": 2, "num_steps": NaN}',
    ],
    ids=["empty", "not-json", "a-list", "zero-rows", "unknown-field", "float-rows", "nan"],
)
def test_a_body_that_does_not_validate_reaches_fastapi_untouched(
    client: TestClient, body: bytes
) -> None:
    inner = Inner()
    status, _, answer = call(DirectPosts(inner), client.app, "/sample", body)
    assert (status, answer, inner.bodies) == (299, b"inner", [body])


def test_an_invalid_body_gets_fastapis_own_422_through_the_app(client: TestClient) -> None:
    body = orjson.dumps({"model": "tiny", "num_samples": 2, "num_steps": 0})
    answer = client.post("/sample", content=body)
    status, _, route_answer = call(fastapi_only(client.app), client.app, "/sample", body)
    assert (answer.status_code, answer.content) == (status, route_answer)
    assert answer.status_code == 422


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "absent", "num_samples": 2, "num_steps": 4}, 404),
        ({"model": "tiny", "num_samples": 10**9, "num_steps": 4}, 413),
    ],
    ids=["unknown-model", "over-a-limit"],
)
def test_a_domain_error_gets_the_apps_handler(
    client: TestClient, body: dict[str, Any], status: int
) -> None:
    inner = Inner()
    raw = orjson.dumps(body)
    got = call(DirectPosts(inner), client.app, "/sample", raw)
    expected = call(fastapi_only(client.app), client.app, "/sample", raw)
    assert inner.bodies == []
    assert got == expected
    assert got[0] == status
