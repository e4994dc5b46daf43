"""Hostile input: schemathesis against the served /openapi.json, and hypothesis over raw JSON
bodies. Whatever arrives, the answer is documented and never a 5xx."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import schemathesis
import torch
from conftest import SERVER_START_TIMEOUT_S, serving, write_module_dir
from fastapi import FastAPI
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.app import create_app
from service.schemas import (
    EncodeRequest,
    LogProbRequest,
    SampleRequest,
    TrajectoryRequest,
    VelocityRequest,
)
from service.settings import Settings

# Small limits: a generated num_samples of 10**12 must meet a 413, not a forward pass.
LIMITS = {
    "max_samples": 16,
    "max_steps": 16,
    "max_row_steps": 16 * 16 * 4,
    "max_trajectory_values": 4096,
    "max_divergence_row_steps": 16 * 16 * 4 * 2,
    "max_probes": 2,
    "max_body_bytes": 4096,
    "max_queue_rows": 64,
    "request_timeout_s": 10.0,
    "warmup_passes": 0,
}


class BoundedField(torch.nn.Module):
    """v(t, x) = tanh(x) + t: |v| <= 2, so no finite float32 start point can overflow; a 500
    could then only be a fault of the service, which is what the fuzzing looks for."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) + t


@pytest.fixture(scope="module")
def bounded_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bounded-models")
    source = {"means": [[0.0, 0.0]], "covs": [[[1.0, 0.0], [0.0, 1.0]]], "weights": [1.0]}
    write_module_dir(root, "bounded", BoundedField(), source, dim=2)
    return root


def _fuzz_app(models_dir: Path):
    return create_app(Settings(models_dir=models_dir, device="cpu", **LIMITS))


def _npy(shape: tuple[int, ...], fill: float) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.full(shape, fill, dtype=np.float32))
    return buffer.getvalue()


# .npy request bodies: real files of a few shapes (right and wrong widths, NaN) and junk bytes.
schemathesis.openapi.media_type(
    "application/x-npy",
    st.one_of(
        st.binary(max_size=64),
        st.builds(
            _npy,
            st.tuples(st.integers(1, 4), st.integers(1, 3)) | st.just((2, 1, 2)),
            st.sampled_from([0.5, -3.0, float("nan")]),
        ),
    ),
)

# The schema is read at collection, from an app that has not started: /openapi.json does not
# depend on the models. The test below checks that the running app serves the same document.
OPENAPI = _fuzz_app(Path("unused")).openapi()
FUZZ_CONFIG = SchemathesisConfig.from_dict(
    {
        "generation": {"max-examples": 25, "deterministic": True},
        # A schema-violating body may also be too large: 413 is a refusal too. 5xx never is.
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": ["400", "401", "404", "405", "406", "413", "415", "422"]
            }
        },
    }
)
schema = schemathesis.openapi.from_dict(OPENAPI, config=FUZZ_CONFIG)


@pytest.fixture
def fuzz_app(bounded_models_dir: Path) -> Iterator[FastAPI]:
    """The app with its lifespan running on schemathesis' ASGI transport, ready.

    Function-scoped: schemathesis' pytest plugin ends every ASGI lifespan after each test.
    """
    app = _fuzz_app(bounded_models_dir)
    with asgi.get_client(app) as client:  # starts the lifespan, which outlives the block
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "app not ready"
            time.sleep(0.02)
        assert client.get("/openapi.json").json() == OPENAPI
    yield app
    asgi.shutdown_lifespans()


@schema.parametrize()
@settings(derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_generated_request_gets_a_documented_answer(
    case: schemathesis.Case, fuzz_app: FastAPI
) -> None:
    # Schema-valid bodies may still be refused: cross-field rules (ragged or wrong-dimension
    # points, stride > num_steps) answer 422 and the limits 413, which that check counts as wrong.
    response = case.call_and_validate(app=fuzz_app, excluded_checks=[positive_data_acceptance])
    assert response.status_code < 500, response.text


REQUESTS = {
    "/sample": SampleRequest,
    "/trajectory": TrajectoryRequest,
    "/encode": EncodeRequest,
    "/log_prob": LogProbRequest,
    "/velocity": VelocityRequest,
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
coordinates = st.floats(-1e6, 1e6, width=32)
points = st.tuples(st.integers(1, 8), st.sampled_from([2, 2, 2, 1, 3])).flatmap(
    lambda shape: st.lists(
        st.lists(coordinates, min_size=shape[1], max_size=shape[1]),
        min_size=shape[0],
        max_size=shape[0],
    )
)
small_ints = st.integers(min_value=-1, max_value=24)
# Values near the valid ones, so that many bodies pass validation and reach the engine.
plausible = {
    "model": st.sampled_from([None, "bounded", "absent", ""]) | st.text(max_size=70),
    "num_samples": small_ints,
    "num_steps": small_ints,
    "seed": st.integers(min_value=-1, max_value=2**64),
    "x0": points,
    "x": points,
    "solver": st.sampled_from(["euler", "midpoint", "heun", "rk4", "Euler", "rk45"]),
    "timeout_s": st.sampled_from([None, 0, -1.0, 0.5, 30.0]),
    "stride": small_ints,
    "divergence": st.sampled_from([None, "exact", "hutchinson", "other"]),
    "num_probes": st.integers(min_value=-1, max_value=4),
    "unknown": json_values,
}
VALID = {
    "/sample": {"num_samples": 3, "num_steps": 4, "seed": 1},
    "/trajectory": {"num_samples": 3, "num_steps": 4, "seed": 1, "stride": 2},
    "/encode": {"x": [[0.5, -1.0]], "num_steps": 4},
    "/log_prob": {"x": [[0.5, -1.0]], "num_steps": 4},
    "/velocity": {"x": [[0.5, -1.0]], "t": 0.5},
}


def request_bodies(path: str) -> st.SearchStrategy:
    """Any JSON value, or a valid body with some fields set to plausible or arbitrary values."""

    def edits(arbitrary: bool) -> st.SearchStrategy:
        keys = st.lists(st.sampled_from(list(plausible)), max_size=3, unique=True)
        return keys.flatmap(
            lambda keys: st.fixed_dictionaries(
                {key: plausible[key] | json_values if arbitrary else plausible[key] for key in keys}
            )
        ).map(lambda change: {**VALID[path], **change})

    return st.one_of(json_values, edits(arbitrary=True), edits(arbitrary=False))


def expected_statuses(path: str, body: str) -> set[int]:
    """What the service may answer `body`, told from the request schema alone."""
    if len(body.encode()) > LIMITS["max_body_bytes"]:
        return {413}
    try:
        request = REQUESTS[path].model_validate_json(body)
    except ValidationError:
        return {422}
    if request.model not in (None, "bounded"):
        return {404}
    points = getattr(request, "x0", None) or getattr(request, "x", None)
    if points is not None and len(points[0]) != 2:
        return {413, 422}  # valid, but not for a model of dim 2; limits are checked first
    if getattr(request, "num_probes", None) is not None and request.divergence is None:
        return {413, 422}  # probes, but dim 2 defaults to the exact divergence
    return {200, 413}


@pytest.fixture(scope="module")
def fuzz_client(bounded_models_dir: Path) -> Iterator:
    with serving(bounded_models_dir, **LIMITS) as client:
        yield client


@pytest.mark.parametrize("path", list(REQUESTS))
@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_json_body_validates_or_is_refused_with_422_or_413(fuzz_client, path, data) -> None:
    value = data.draw(request_bodies(path))
    body = json.dumps(value)
    response = fuzz_client.post(path, content=body, headers={"Content-Type": "application/json"})
    event(f"status {response.status_code}")  # --hypothesis-show-statistics tells the mix
    answer = response.json()
    assert response.status_code in expected_statuses(path, body), answer
    if response.status_code != 200:
        assert set(answer) == {"detail"}
        assert isinstance(answer["detail"], str) and answer["detail"]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"\x80abc", "body: not valid JSON (not UTF-8 text)"),
        (b"\xff\xfe", "body: not valid JSON (Expecting value)"),
        (b'{"x0": [[NaN, 1.0]]}', "x0[0][0]: Input should be a finite number"),
        (b'{"x0": [[1.0, -Infinity]]}', "x0[0][1]: Input should be a finite number"),
        (b'{"num_samples": 1e400}', "num_samples: Input should be a valid integer"),
        (b"[1, 2]", "body: Input should be a valid dictionary or object to extract fields from"),
    ],
    ids=["not-utf8", "utf16-bom", "nan", "infinity", "overflowing-number", "array"],
)
def test_malformed_bytes_are_422_with_what_is_wrong(fuzz_client, body, detail) -> None:
    response = fuzz_client.post(
        "/sample", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json() == {"detail": detail}
