"""The Ray Serve integration's parts, without a cluster: the proxy's error rewriting, picklable
bodies, settings from a Serve config, replica readiness and health. The cluster itself is
tests/test_ray_serve.py."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
from pathlib import Path

import numpy as np
import orjson
import pytest
from conftest import write_model_dir
from fastapi.testclient import TestClient

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install flowserve[ray])")

from ray.serve import Application

from service.app import create_app
from service.ray_serve import (
    BadServeConfig,
    ContractErrors,
    PicklableBodies,
    build,
    proxy_middlewares,
    replica_fault,
    settings_from,
)
from service.registry import ModelsNotReady, Registry, load_ready
from service.settings import Settings

# ---------------------------------------------------------------- ASGI driving


def answer(*messages: dict, raises: BaseException | None = None):
    """An inner ASGI app that sends `messages`, then raises `raises` if given."""

    async def app(scope, receive, send):
        for message in messages:
            await send(message)
        if raises is not None:
            raise raises

    return app


def run(app, scope_type: str = "http") -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def go():
        with contextlib.suppress(RuntimeError):  # an inner failure still propagates
            await app({"type": scope_type, "path": "/sample", "method": "POST"}, receive, send)

    asyncio.run(go())
    return sent


def start(status: int, kind: bytes, *extra: tuple[bytes, bytes]) -> dict:
    headers = [(b"content-type", kind), *extra]
    return {"type": "http.response.start", "status": status, "headers": headers}


def body(data: bytes, more: bool = False) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


def parsed(sent: list[dict]) -> tuple[int, dict[bytes, bytes], dict]:
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    headers = dict(sent[0]["headers"])
    payload = orjson.loads(sent[1]["body"])
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(sent[1]["body"])
    return sent[0]["status"], headers, payload


# ---------------------------------------------------------------- the proxy's middleware


def test_serve_plain_text_503_becomes_detail_with_retry_after() -> None:
    inner = answer(
        start(503, b"text/plain; charset=utf-8", (b"x-request-id", b"r1")),
        body(b"Service Unavailable: ", more=True),
        body(b"no replica\n"),
    )
    status, headers, payload = parsed(run(ContractErrors(inner)))
    assert status == 503
    assert payload == {"detail": "Service Unavailable: no replica"}
    assert headers[b"retry-after"] == b"1"
    assert headers[b"x-request-id"] == b"r1"


def test_serve_retry_after_is_kept() -> None:
    inner = answer(start(503, b"text/plain", (b"retry-after", b"7")), body(b"busy"))
    status, headers, payload = parsed(run(ContractErrors(inner)))
    assert (status, headers[b"retry-after"], payload) == (503, b"7", {"detail": "busy"})


def test_other_plain_errors_keep_their_status_without_retry_after() -> None:
    inner = answer(start(408, b"text/plain"), body(b"Request timed out"))
    status, headers, payload = parsed(run(ContractErrors(inner)))
    assert (status, payload) == (408, {"detail": "Request timed out"})
    assert b"retry-after" not in headers


def test_empty_plain_error_still_has_a_detail() -> None:
    inner = answer(start(500, b"text/plain"), body(b""))
    status, _, payload = parsed(run(ContractErrors(inner)))
    assert (status, payload) == (500, {"detail": "error"})


def test_no_answer_at_all_is_a_retryable_503() -> None:
    inner = answer(raises=RuntimeError("replica actor died"))
    status, headers, payload = parsed(run(ContractErrors(inner)))
    assert status == 503
    assert payload == {"detail": "the replica serving this request was lost; retry"}
    assert headers[b"retry-after"] == b"1"


@pytest.mark.parametrize(
    "messages",
    [
        (start(200, b"application/json"), body(b'{"samples": []}')),
        (start(422, b"application/json"), body(b'{"detail": "n: too big"}')),
        (start(200, b"application/x-npy"), body(b"\x93NUMPY", more=True), body(b"rest")),
    ],
    ids=["json-200", "json-error", "npy-chunked"],
)
def test_the_apps_answers_pass_unchanged(messages: tuple[dict, ...]) -> None:
    assert run(ContractErrors(answer(*messages))) == list(messages)


def test_non_http_scopes_pass_through() -> None:
    sent = run(ContractErrors(answer()), scope_type="lifespan")
    assert sent == []  # no 503 invented for a scope that never answers


def test_proxy_middlewares_names_the_rewriter() -> None:
    (middleware,) = proxy_middlewares()
    assert middleware.cls is ContractErrors


# ---------------------------------------------------------------- replica side


def test_picklable_bodies_turns_memoryviews_into_bytes() -> None:
    view = memoryview(bytearray(b"\x93NUMPY-data"))
    with pytest.raises(TypeError, match="memoryview"):
        pickle.dumps({"body": view})
    sent = run(PicklableBodies(answer(start(200, b"application/x-npy"), body(view))))  # type: ignore[arg-type]
    assert isinstance(sent[1]["body"], bytes)
    assert pickle.loads(pickle.dumps(sent))[1]["body"] == b"\x93NUMPY-data"


def test_settings_from_a_serve_config(tmp_path: Path) -> None:
    settings = settings_from({"models_dir": str(tmp_path), "torch_threads": 1})
    assert (settings.models_dir, settings.torch_threads) == (tmp_path, 1)


def test_bad_settings_fail_the_deploy_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(BadServeConfig) as info:
        build({"models_dir": str(tmp_path), "max_batch_rows": 0})
    message = str(info.value)
    assert message.startswith("flowserve settings: ")
    assert "max_batch_rows" in message
    assert "\n" not in message


def test_build_binds_the_deployment(tmp_path: Path) -> None:
    assert isinstance(build({"models_dir": str(tmp_path)}), Application)


def test_load_ready_refuses_an_empty_models_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelsNotReady) as info:
        asyncio.run(load_ready(Settings(models_dir=tmp_path)))
    assert "holds no model folder" in str(info.value)
    assert "\n" not in str(info.value)


def test_load_ready_refuses_a_tampered_model(tmp_path: Path) -> None:
    folder = write_model_dir(tmp_path, "tiny")
    (folder / "model.pt").write_bytes((folder / "model.pt").read_bytes() + b"x")
    with pytest.raises(ModelsNotReady) as info:
        asyncio.run(load_ready(Settings(models_dir=tmp_path, warmup_passes=0)))
    message = str(info.value)
    assert message.startswith("model tiny was refused: sha256 mismatch")
    assert "\n" not in message


def test_load_ready_returns_warm_models_the_app_serves(tmp_path: Path) -> None:
    write_model_dir(tmp_path, "tiny", a=0.5)
    settings = Settings(models_dir=tmp_path, warmup_passes=1)
    registry = asyncio.run(load_ready(settings))
    assert isinstance(registry, Registry)
    assert registry.not_ready() is None
    assert replica_fault(registry) is not None  # no watchdog yet: the app starts it
    with TestClient(create_app(settings, registry=registry)) as client:
        assert client.get("/readyz").status_code == 200
        assert replica_fault(registry) is None
        x0 = [[1.0, -2.0], [0.5, 4.0]]
        answer_ = client.post("/sample", json={"x0": x0, "num_steps": 2, "solver": "euler"})
        assert answer_.status_code == 200
        # v = 0.5 x, two Euler steps of 1/2: x0 (1 + 0.25)^2
        samples = np.array(answer_.json()["samples"])
        np.testing.assert_allclose(samples, 1.5625 * np.array(x0), atol=1e-6)
    assert registry.closed
    assert replica_fault(registry) == "the engine watchdog is not running"


def test_a_registry_that_gave_up_fails_the_health_check(tmp_path: Path) -> None:
    write_model_dir(tmp_path, "tiny")
    registry = asyncio.run(load_ready(Settings(models_dir=tmp_path, warmup_passes=0)))
    try:
        registry.fatal = "engine of model tiny failed 3 times in 60 s"
        assert replica_fault(registry) == "engine of model tiny failed 3 times in 60 s"
    finally:
        registry.close()
