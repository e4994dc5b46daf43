"""BearerAuth and BodyLimit: who gets in, and how large a body may be, in-process and against a
real server process whose log must never show a key."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port, running_server, service_command, serving
from fastapi.testclient import TestClient

from service.middleware import BodyLimit

KEYS = ("first-key-0123456789", "second-key-abcdef")
AUTH_DETAIL = "authorization: a valid 'Authorization: Bearer <key>' header is required"
BODY_LIMIT = 2048
SAMPLE = {"num_samples": 2, "num_steps": 4, "seed": 3}


@pytest.fixture(scope="module")
def keyed_client(tiny_models_dir: Path) -> Iterator[TestClient]:
    with serving(tiny_models_dir, api_key=f" {KEYS[0]}, {KEYS[1]} ,") as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong"),
        bearer(KEYS[0][:-1]),
        bearer(KEYS[0] + "x"),
        bearer(f"{KEYS[0]},{KEYS[1]}"),
        bearer(""),
        {"Authorization": KEYS[0]},
        {"Authorization": f"Basic {KEYS[0]}"},
        {"Authorization": f"Token {KEYS[1]}"},
    ],
    ids=[
        "missing",
        "wrong",
        "prefix",
        "longer",
        "both-keys",
        "empty",
        "no-scheme",
        "basic",
        "other-scheme",
    ],
)
@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/sample"), ("GET", "/models"), ("GET", "/metrics")]
)
def test_without_a_valid_key_the_answer_is_401(keyed_client, headers, method, path) -> None:
    response = keyed_client.request(
        method, path, headers=headers, json=SAMPLE if method == "POST" else None
    )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="flowserve"'
    assert response.json() == {"detail": AUTH_DETAIL}
    for key in KEYS:
        assert key not in response.text
        assert key not in str(response.headers)


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_each_configured_key_lets_the_request_in(keyed_client, key, scheme) -> None:
    response = keyed_client.post(
        "/sample", headers={"Authorization": f"{scheme} {key}"}, json=SAMPLE
    )
    assert response.status_code == 200
    assert response.json()["num_samples"] == 2
    assert keyed_client.get("/models", headers=bearer(key)).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_and_readiness_need_no_key(keyed_client, path) -> None:
    assert keyed_client.get(path).status_code == 200


def test_without_keys_no_header_is_needed(tiny_models_dir: Path) -> None:
    with serving(tiny_models_dir) as client:
        assert client.post("/sample", json=SAMPLE).status_code == 200


def test_keys_never_reach_the_logs_in_process(keyed_client, caplog) -> None:
    with caplog.at_level(logging.DEBUG):
        keyed_client.post("/sample", headers=bearer(KEYS[0]), json=SAMPLE)
        keyed_client.post("/sample", headers=bearer(KEYS[1][:-1]), json=SAMPLE)
        keyed_client.get("/models", headers=bearer("wrong"))
    assert caplog.records
    for key in KEYS:
        assert key not in caplog.text
        assert key[:-1] not in caplog.text


@pytest.fixture(scope="module")
def keyed_server(
    tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """A real server with both keys, a small body limit and debug logging: (url, log file)."""
    port = free_port()
    log = tmp_path_factory.mktemp("keyed-server") / "server.log"
    env = {
        "FLOW_DEVICE": "cpu",
        "FLOW_LOG_LEVEL": "debug",
        "FLOW_API_KEY": ",".join(KEYS),
        "FLOW_MAX_BODY_BYTES": str(BODY_LIMIT),
    }
    with running_server(service_command(tiny_models_dir, port), port, log, env=env) as url:
        yield url, log


def test_a_real_server_never_logs_its_keys(keyed_server) -> None:
    url, log = keyed_server
    answers = [
        httpx.post(f"{url}/sample", json=SAMPLE, headers=bearer(KEYS[0])),
        httpx.post(f"{url}/sample", json=SAMPLE, headers=bearer(KEYS[1])),
        httpx.post(f"{url}/sample", json=SAMPLE, headers=bearer(KEYS[0][:-1])),
        httpx.post(f"{url}/sample", json=SAMPLE),
        httpx.post(f"{url}/sample", content=b"{", headers=bearer(KEYS[0])),
        httpx.get(f"{url}/models/absent", headers=bearer(KEYS[1])),
    ]
    assert [a.status_code for a in answers] == [200, 200, 401, 401, 422, 404]
    text = log.read_text()
    assert '"path":"/sample"' in text  # the access log did record the requests
    for key in KEYS:
        assert key not in text
        assert key[:-1] not in text
        for answer in answers:
            assert key not in answer.text


def test_a_real_server_refuses_an_oversized_chunked_body(keyed_server) -> None:
    url, _ = keyed_server
    body = (b" " * 1024 for _ in range(64))
    response = httpx.post(
        f"{url}/sample",
        content=body,
        headers={"Content-Type": "application/json", **bearer(KEYS[0])},
    )
    assert response.status_code == 413
    assert httpx.get(f"{url}/healthz").status_code == 200


@pytest.fixture(scope="module")
def limited_client(tiny_models_dir: Path) -> Iterator[TestClient]:
    with serving(tiny_models_dir, max_body_bytes=BODY_LIMIT) as client:
        yield client


def padded_body(size: int) -> bytes:
    """A valid /sample body of exactly `size` bytes (spaces are valid JSON whitespace)."""
    body = json.dumps(SAMPLE).encode()
    return body + b" " * (size - len(body))


@pytest.mark.parametrize(
    ("size", "status"), [(BODY_LIMIT - 1, 200), (BODY_LIMIT, 200), (BODY_LIMIT + 1, 413)]
)
def test_content_length_over_the_limit_is_413(limited_client, size, status) -> None:
    response = limited_client.post(
        "/sample", content=padded_body(size), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status
    if status == 413:
        assert response.json() == {
            "detail": f"body: {size} bytes is over the limit of {BODY_LIMIT} bytes "
            "(FLOW_MAX_BODY_BYTES)"
        }


def test_a_chunked_body_over_the_limit_is_413(limited_client) -> None:
    chunks = (b" " * 512 for _ in range(64))  # 32 KiB of whitespace, 16 times the limit
    response = limited_client.post(
        "/sample", content=chunks, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json() == {
        "detail": f"body: more than {BODY_LIMIT} bytes is over the limit of {BODY_LIMIT} bytes "
        "(FLOW_MAX_BODY_BYTES)"
    }


async def test_body_limit_stops_reading_at_the_limit() -> None:
    """At the ASGI level: the chunks after the limit are never pulled, the app never runs."""
    pulled = 0

    async def receive():
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b" " * 512, "more_body": True}  # endless

    sent = []

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        raise AssertionError("the app must not see an oversized body")

    scope = {"type": "http", "method": "POST", "path": "/sample", "headers": []}
    await BodyLimit(app, limit=BODY_LIMIT)(scope, receive, send)
    assert pulled == BODY_LIMIT // 512 + 1
    assert sent[0]["status"] == 413


def test_a_chunked_body_within_the_limit_is_served(limited_client) -> None:
    body = padded_body(BODY_LIMIT)
    chunks = [body[i : i + 300] for i in range(0, len(body), 300)]
    response = limited_client.post(
        "/sample", content=iter(chunks), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200
    assert response.json()["seed"] == SAMPLE["seed"]


def test_the_docs_work_with_a_key_and_without_internet(keyed_client) -> None:
    page = keyed_client.get("/docs")
    assert page.status_code == 200
    # Swagger UI's script and style come from this server, not from a CDN.
    assert "/docs/static/swagger-ui-bundle.js" in page.text
    assert "cdn." not in page.text and "https://" not in page.text.split("<body>")[0]
    script = keyed_client.get("/docs/static/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
    spec = keyed_client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path in ("/sample", "/trajectory", "/encode", "/log_prob"):
        assert spec["paths"][path]["post"]["security"] == [{"bearer": []}]
    for path in ("/models", "/metrics"):
        assert spec["paths"][path]["get"]["security"] == [{"bearer": []}]
    for path in ("/healthz", "/readyz"):
        assert "security" not in spec["paths"][path]["get"]
    # The document describes what the service answers: /metrics is text, every endpoint named.
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    for endpoint in ("/sample", "/trajectory", "/encode", "/log_prob", "/models", "/metrics"):
        assert endpoint in spec["info"]["description"]


def test_without_keys_no_security_is_declared_and_docs_can_be_turned_off(
    tiny_models_dir: Path,
) -> None:
    with serving(tiny_models_dir) as plain:
        assert "securitySchemes" not in plain.get("/openapi.json").json().get("components", {})
    with serving(tiny_models_dir, docs=False) as bare:
        assert bare.get("/docs").status_code == 404
        assert bare.get("/openapi.json").status_code == 404
        assert bare.get("/healthz").status_code == 200
