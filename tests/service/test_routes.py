"""The HTTP API in-process, lifespan running: every endpoint, every error with its status and
message, the numbers against independent loops over the same TorchScript modules, batching."""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import (
    ENGINES,
    euler_reference,
    serving,
    write_model_dir,
    write_module_dir,
    write_post_model,
)
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import multivariate_normal

from service.app import create_app
from service.mixture import GaussianMixture
from service.settings import Settings
from service.solvers import integrate

NPY = "application/x-npy"
LIMITS = {
    "max_samples": 4096,
    "max_steps": 1000,
    "max_row_steps": 200_000,
    "max_trajectory_values": 30_000,
    "max_body_bytes": 64 * 1024,
    "max_queue_rows": 8192,
}
ODD_SOURCE = {
    "means": [[1.0, -1.0, 0.5], [-2.0, 0.5, 1.0]],
    "covs": [
        [[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.8]],
        [[0.4, -0.1, 0.05], [-0.1, 1.2, 0.2], [0.05, 0.2, 0.6]],
    ],
    "weights": [0.3, 0.7],
}
"""Source of the `odd` model: d = 3, two components with full covariances."""


class TanhResidual(torch.nn.Module):
    """Not our exporter's network: v(t, x) = W2 tanh(W1 [x, t]) - x / 2."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(4, 8)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(torch.cat([x, t], dim=1)))) - 0.5 * x


class NanLate(torch.nn.Module):
    """A broken model: NaN for t >= 0.5."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * torch.where(t < 0.5, 0.0, float("nan"))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("route-models")
    write_model_dir(root, "tiny", dim=2, a=0.5)
    write_post_model(root, "post", dim=2, seed=3)
    torch.manual_seed(4)
    write_module_dir(root, "odd", TanhResidual().eval(), ODD_SOURCE, 3)
    nan_source = {"means": [[0.0, 0.0]], "covs": [np.eye(2).tolist()], "weights": [1.0]}
    write_module_dir(root, "nan", NanLate(), nan_source, 2)
    return root


@pytest.fixture(scope="module", params=ENGINES)
def client(models_dir: Path, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """The app, its engines in a thread or in an engine process: the same suite for both."""
    with serving(models_dir, request.param, default_model="tiny", **LIMITS) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def modules(models_dir: Path) -> dict[str, torch.jit.ScriptModule]:
    """The served files, loaded independently of the service."""
    return {
        name: torch.jit.load(str(models_dir / name / "model.pt")).eval()
        for name in ("tiny", "post", "odd")
    }


def euler_states(module, x0: torch.Tensor, num_steps: int) -> list[torch.Tensor]:
    """Every state of the contract's Euler loop, x[0] .. x[K]."""
    states = [x0.clone()]
    with torch.no_grad():
        for k in range(num_steps):
            t = torch.full((x0.shape[0], 1), k / num_steps)
            states.append(states[-1] + (1.0 / num_steps) * module(t, states[-1]))
    return states


def runge_kutta(module, x0: torch.Tensor, num_steps: int, solver: str) -> list[torch.Tensor]:
    """Every state of the textbook formulas, written out: midpoint, Heun (trapezoid), RK4."""
    h = 1.0 / num_steps
    states = [x0.clone()]

    def v(t: float, y: torch.Tensor) -> torch.Tensor:
        return module(torch.full((y.shape[0], 1), t), y)

    with torch.no_grad():
        for k in range(num_steps):
            t, x = k * h, states[-1]
            if solver == "midpoint":
                x = x + h * v(t + h / 2, x + (h / 2) * v(t, x))
            elif solver == "heun":
                k1 = v(t, x)
                x = x + (h / 2) * (k1 + v(t + h, x + h * k1))
            else:
                k1 = v(t, x)
                k2 = v(t + h / 2, x + (h / 2) * k1)
                k3 = v(t + h / 2, x + (h / 2) * k2)
                k4 = v(t + h, x + h * k3)
                x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
            states.append(x)
    return states


def tensor(value: list) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def npy(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == NPY
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def post_ok(client: TestClient, path: str, body: dict, **headers: str) -> httpx.Response:
    response = client.post(path, json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response


def metric(client: TestClient, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when the series does not exist yet)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# ------------------------------------------------------------------- /sample and /trajectory


def test_sample_answers_the_contract_fields(client: TestClient) -> None:
    response = post_ok(
        client, "/sample", {"model": "post", "num_samples": 5, "num_steps": 8, "seed": 11}
    )
    body = response.json()
    assert {k: body[k] for k in ("model", "num_samples", "num_steps", "dim", "seed")} == {
        "model": "post",
        "num_samples": 5,
        "num_steps": 8,
        "dim": 2,
        "seed": 11,
    }
    assert (body["solver"], body["nfe"]) == ("euler", 8)
    assert np.asarray(body["samples"]).shape == (5, 2)
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-flow-model"] == "post"
    assert response.headers["x-flow-seed"] == "11"


def test_sample_equals_an_independent_euler_loop(client: TestClient, modules) -> None:
    seeded = {"model": "post", "num_samples": 6, "num_steps": 10, "seed": 5}
    start = post_ok(client, "/trajectory", {**seeded, "stride": 10}).json()["trajectory"][0]
    samples = tensor(post_ok(client, "/sample", seeded).json()["samples"])
    expected = euler_reference(modules["post"], tensor(start), 10)
    torch.testing.assert_close(samples, expected, rtol=1e-5, atol=1e-5)


def test_a_seed_gives_the_sources_own_draw(client: TestClient, models_dir: Path) -> None:
    seeded = {"model": "odd", "num_samples": 40, "num_steps": 2, "stride": 2, "seed": 21}
    start = post_ok(client, "/trajectory", seeded).json()["trajectory"][0]
    source = json.loads((models_dir / "odd" / "manifest.json").read_text())["source"]
    expected = GaussianMixture.from_spec(source).sample(40, torch.Generator().manual_seed(21))
    torch.testing.assert_close(tensor(start), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny", "post", "odd"])
def test_sample_from_x0_equals_an_independent_euler_loop(
    client: TestClient, modules, name: str
) -> None:
    dim = {"tiny": 2, "post": 2, "odd": 3}[name]
    x0 = torch.randn(7, dim, generator=torch.Generator().manual_seed(1))
    body = post_ok(client, "/sample", {"model": name, "x0": x0.tolist(), "num_steps": 9}).json()
    assert (body["num_samples"], body["dim"], body["seed"]) == (7, dim, None)
    expected = euler_reference(modules[name], x0, 9)
    torch.testing.assert_close(tensor(body["samples"]), expected, rtol=1e-5, atol=1e-5)


def test_tiny_model_matches_its_closed_form(client: TestClient) -> None:
    # v = x / 2: Euler multiplies by (1 + 1 / (2K)) per step.
    x0 = [[1.0, -2.0], [0.25, 4.0]]
    body = post_ok(client, "/sample", {"model": "tiny", "x0": x0, "num_steps": 4}).json()
    np.testing.assert_allclose(body["samples"], np.array(x0) * (1 + 0.5 / 4) ** 4, rtol=1e-6)


def test_trajectory_states_equal_the_euler_states(client: TestClient, modules) -> None:
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    body = post_ok(
        client, "/trajectory", {"model": "post", "x0": x0.tolist(), "num_steps": 7, "stride": 3}
    ).json()
    assert body["times"] == [0.0, 3 / 7, 6 / 7, 1.0]
    states = euler_states(modules["post"], x0, 7)
    expected = torch.stack([states[k] for k in (0, 3, 6, 7)])
    torch.testing.assert_close(tensor(body["trajectory"]), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states[-1], euler_reference(modules["post"], x0, 7))


@pytest.mark.parametrize(
    ("num_steps", "stride", "times"),
    [
        (4, 1, [0.0, 0.25, 0.5, 0.75, 1.0]),
        (5, 2, [0.0, 0.4, 0.8, 1.0]),
        (6, 3, [0.0, 0.5, 1.0]),
        (3, 3, [0.0, 1.0]),
        (1, 1, [0.0, 1.0]),
    ],
)
def test_trajectory_times_for_each_stride(
    client: TestClient, num_steps: int, stride: int, times: list[float]
) -> None:
    request = {"num_samples": 3, "num_steps": num_steps, "stride": stride, "seed": 1}
    body = post_ok(client, "/trajectory", request).json()
    assert body["times"] == pytest.approx(times, abs=1e-12)
    assert body["stride"] == stride
    assert np.asarray(body["trajectory"]).shape == (len(times), 3, 2)


def test_trajectory_end_is_the_sample_for_the_same_seed(client: TestClient) -> None:
    seeded = {"model": "post", "num_samples": 9, "num_steps": 6, "seed": 77}
    samples = post_ok(client, "/sample", seeded).json()["samples"]
    trajectory = post_ok(client, "/trajectory", {**seeded, "stride": 4}).json()["trajectory"]
    np.testing.assert_allclose(trajectory[-1], samples, rtol=1e-6, atol=1e-6)


def test_npy_answers_and_headers(client: TestClient) -> None:
    seeded = {"model": "post", "num_samples": 5, "num_steps": 4, "seed": 3}
    as_json = post_ok(client, "/sample", seeded).json()
    response = post_ok(client, "/sample", seeded, Accept=NPY)
    array = npy(response)
    assert (array.dtype, array.shape) == (np.float32, (5, 2))
    np.testing.assert_array_equal(array, np.asarray(as_json["samples"], dtype=np.float32))
    headers = {k: response.headers[f"x-flow-{k}"] for k in ("model", "seed", "num-steps")}
    assert headers == {"model": "post", "seed": "3", "num-steps": "4"}
    assert (response.headers["x-flow-solver"], response.headers["x-flow-nfe"]) == ("euler", "4")

    response = post_ok(client, "/trajectory", {**seeded, "stride": 3}, Accept=NPY)
    path = npy(response)
    assert (path.dtype, path.shape) == (np.float32, (3, 5, 2))
    assert response.headers["x-flow-stride"] == "3"
    np.testing.assert_allclose(path[-1], array, rtol=1e-6, atol=1e-6)


def test_a_seed_left_out_is_drawn_echoed_and_reproduces(client: TestClient) -> None:
    first = post_ok(client, "/sample", {"num_samples": 4, "num_steps": 2})
    seed = first.json()["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**63
    assert first.headers["x-flow-seed"] == str(seed)
    again = post_ok(client, "/sample", {"num_samples": 4, "num_steps": 2, "seed": seed})
    assert again.json()["samples"] == first.json()["samples"]
    other = post_ok(client, "/sample", {"num_samples": 4, "num_steps": 2})
    assert other.json()["seed"] != seed
    assert other.json()["samples"] != first.json()["samples"]


def test_different_seeds_give_different_start_points(client: TestClient) -> None:
    a = post_ok(client, "/sample", {"num_samples": 4, "num_steps": 1, "seed": 1}).json()
    b = post_ok(client, "/sample", {"num_samples": 4, "num_steps": 1, "seed": 2}).json()
    assert a["samples"] != b["samples"]


def test_the_default_model_serves_when_none_is_named(client: TestClient) -> None:
    assert post_ok(client, "/sample", {"num_samples": 1, "seed": 0}).json()["model"] == "tiny"


# ------------------------------------------------------------------- solvers


@pytest.mark.parametrize(("solver", "stages"), [("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_each_solver_equals_two_independent_implementations(
    client: TestClient, modules, solver: str, stages: int
) -> None:
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(9))
    request = {"model": "post", "x0": x0.tolist(), "num_steps": 6, "solver": solver}
    response = post_ok(client, "/sample", request)
    body = response.json()
    assert (body["solver"], body["nfe"]) == (solver, 6 * stages)
    assert response.headers["x-flow-nfe"] == str(6 * stages)
    got = tensor(body["samples"])
    with torch.no_grad():
        library = integrate(modules["post"], x0, 6, solver)
    torch.testing.assert_close(got, library, rtol=1e-5, atol=1e-5)
    by_hand = runge_kutta(modules["post"], x0, 6, solver)[-1]
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-5)


def test_a_solver_trajectory_keeps_whole_steps(client: TestClient, modules) -> None:
    x0 = torch.randn(3, 3, generator=torch.Generator().manual_seed(4))
    request = {"model": "odd", "x0": x0.tolist(), "num_steps": 4, "solver": "rk4", "stride": 2}
    body = post_ok(client, "/trajectory", request).json()
    assert (body["times"], body["nfe"]) == ([0.0, 0.5, 1.0], 16)
    trajectory = tensor(body["trajectory"])
    states = runge_kutta(modules["odd"], x0, 4, "rk4")
    torch.testing.assert_close(trajectory, torch.stack(states[::2]), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        kept = integrate(modules["odd"], x0, 4, "rk4", stride=2)
    torch.testing.assert_close(trajectory, kept, rtol=1e-5, atol=1e-5)


def test_a_solver_converges_on_the_closed_form(client: TestClient) -> None:
    # v = x / 2 from x0: exact answer x0 e^(1/2); rk4 with 8 steps is within 1e-6 relative.
    x0 = [[1.0, -3.0]]
    body = post_ok(
        client, "/sample", {"model": "tiny", "x0": x0, "num_steps": 8, "solver": "rk4"}
    ).json()
    np.testing.assert_allclose(body["samples"], np.array(x0) * math.exp(0.5), rtol=2e-6)


# ------------------------------------------------------------------- bad input

BAD = [
    ("/sample", b'{"num_samples": 2', "body: not valid JSON (Expecting ',' delimiter)"),
    (
        "/sample",
        b"[1, 2]",
        "body: Input should be a valid dictionary or object to extract fields from",
    ),
    (
        "/sample",
        b'"text"',
        "body: Input should be a valid dictionary or object to extract fields from",
    ),
    (
        "/sample",
        {"x0": [[1, 2], [3]]},
        "x0: rows must all have the same length; row 0 has 2, row 1 has 1",
    ),
    ("/sample", {"x0": []}, "x0: must hold at least one point"),
    ("/sample", {"x0": [[]]}, "x0: points must have at least one coordinate"),
    (
        "/trajectory",
        {"num_samples": 2, "num_steps": 4, "stride": 0},
        "stride: Input should be greater than or equal to 1",
    ),
    (
        "/trajectory",
        {"num_samples": 2, "num_steps": 4, "stride": 5},
        "stride: 5 is larger than num_steps (4)",
    ),
    (
        "/sample",
        {"num_samples": 2, "seed": 10**30},
        "seed: Input should be less than or equal to 9223372036854775807",
    ),
    ("/sample", {"num_samples": 2, "seed": -1}, "seed: Input should be greater than or equal to 0"),
    (
        "/sample",
        {"x0": [[1e39, 0.0]]},
        "x0: coordinates must lie within +-1e+06 (FLOW_MAX_ABS_INPUT); got inf",
    ),
    (
        "/sample",
        {"x0": [[3e38, 0.0]]},
        "x0: coordinates must lie within +-1e+06 (FLOW_MAX_ABS_INPUT); got 3e+38",
    ),
    ("/sample", {"num_samples": "2"}, "num_samples: Input should be a valid integer"),
    ("/sample", {"num_samples": 2.5}, "num_samples: Input should be a valid integer"),
    ("/sample", {"num_samples": True}, "num_samples: Input should be a valid integer"),
    ("/sample", {"num_samples": 2, "num_steps": "4"}, "num_steps: Input should be a valid integer"),
    ("/sample", {"x0": [["a", 0.0]]}, "x0[0][0]: Input should be a valid number"),
    ("/sample", b'{"x0": [[NaN, 0]]}', "x0[0][0]: Input should be a finite number"),
    ("/sample", b'{"x0": [[0, Infinity]]}', "x0[0][1]: Input should be a finite number"),
    ("/sample", b'{"x0": [[-Infinity, 0]]}', "x0[0][0]: Input should be a finite number"),
    ("/sample", b'{"x0": [[1e400, 0]]}', "x0[0][0]: Input should be a finite number"),
    ("/sample", {"x0": [[1.0, 2.0, 3.0]]}, "x0: points have 3 coordinates; model tiny has dim 2"),
    (
        "/sample",
        {"model": "odd", "x0": [[1.0, 2.0]]},
        "x0: points have 2 coordinates; model odd has dim 3",
    ),
    (
        "/sample",
        {"x0": [[1.0, 2.0]], "num_samples": 3},
        "num_samples: 3 disagrees with x0 (1 points)",
    ),
    (
        "/sample",
        {"num_samples": 2, "num_steps": 0},
        "num_steps: Input should be greater than or equal to 1",
    ),
    ("/sample", {"num_samples": 0}, "num_samples: Input should be greater than or equal to 1"),
    ("/sample", {}, "num_samples: required when x0 is not given"),
    ("/sample", {"num_samples": 2, "bogus": 1}, "bogus: Extra inputs are not permitted"),
    ("/sample", {"num_samples": 2, "stride": 1}, "stride: Extra inputs are not permitted"),
    (
        "/sample",
        {"num_samples": 2, "solver": "rk5"},
        "solver: Input should be 'euler', 'midpoint', 'heun' or 'rk4'",
    ),
    (
        "/trajectory",
        {"num_samples": 2, "solver": "Euler"},
        "solver: Input should be 'euler', 'midpoint', 'heun' or 'rk4'",
    ),
    ("/sample", {"num_samples": 2, "timeout_s": 0}, "timeout_s: Input should be greater than 0"),
    ("/encode", {"x": [[1.0, 2.0, 3.0]]}, "x: points have 3 coordinates; model tiny has dim 2"),
    (
        "/encode",
        {"x": [[1.0], [1.0, 2.0]]},
        "x: rows must all have the same length; row 0 has 1, row 1 has 2",
    ),
]


@pytest.mark.parametrize(("path", "body", "detail"), BAD)
def test_bad_input_is_422_naming_the_field(
    client: TestClient, path: str, body: dict | bytes, detail: str
) -> None:
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": detail}


LIMITED = [
    (
        "/sample",
        {"num_samples": 5000},
        "num_samples: 5000 is over the limit of 4096 (FLOW_MAX_SAMPLES)",
    ),
    (
        "/sample",
        {"num_samples": 10**30, "num_steps": 4},
        f"num_samples: {10**30} is over the limit of 4096 (FLOW_MAX_SAMPLES)",
    ),
    (
        "/sample",
        {"num_samples": 2, "num_steps": 1001},
        "num_steps: 1001 is over the limit of 1000 (FLOW_MAX_STEPS)",
    ),
    (
        "/sample",
        {"num_samples": 2, "num_steps": 10**30},
        f"num_steps: {10**30} is over the limit of 1000 (FLOW_MAX_STEPS)",
    ),
    (
        "/sample",
        {"num_samples": 400, "num_steps": 600},
        "num_samples x nfe: 240000 is over the limit of 200000 (FLOW_MAX_ROW_STEPS)",
    ),
    (
        "/sample",
        {"num_samples": 400, "num_steps": 200, "solver": "rk4"},
        "num_samples x nfe: 320000 is over the limit of 200000 (FLOW_MAX_ROW_STEPS)",
    ),
    (
        "/trajectory",
        {"num_samples": 1500, "num_steps": 20, "stride": 2},
        "trajectory size (kept states x num_samples x dim): 33000 is over the limit of 30000 "
        "(FLOW_MAX_TRAJECTORY_VALUES)",
    ),
]


@pytest.mark.parametrize(("path", "body", "detail"), LIMITED)
def test_limits_are_413_naming_the_limit(
    client: TestClient, path: str, body: dict, detail: str
) -> None:
    response = client.post(path, json=body)
    assert (response.status_code, response.json()) == (413, {"detail": detail})


def test_a_body_over_the_limit_is_413(client: TestClient) -> None:
    body = json.dumps({"x0": [[0.5, 0.5]] * 7000}).encode()
    response = client.post("/sample", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {
        "detail": f"body: {len(body)} bytes is over the limit of 65536 bytes (FLOW_MAX_BODY_BYTES)"
    }


@pytest.mark.parametrize("path", ["/sample", "/trajectory", "/encode"])
def test_an_unknown_model_is_404(client: TestClient, path: str) -> None:
    body = {"model": "nope", "num_samples": 1, "x": [[0.0, 0.0]]}
    if path != "/encode":
        body.pop("x")
    else:
        body.pop("num_samples")
    response = client.post(path, json=body)
    assert response.status_code == 404
    assert response.json() == {
        "detail": "model: unknown model 'nope'; loaded: nan, odd, post, tiny"
    }


def test_a_full_queue_is_503_with_retry_after(client: TestClient) -> None:
    if client.app.state.settings.engine_address:
        pytest.skip("the queue is the engine process's: test_engine_process fills it there")
    engine = client.app.state.registry.served["tiny"].engine
    release = engine.reserve(LIMITS["max_queue_rows"] - 1)
    try:
        response = client.post("/sample", json={"num_samples": 2, "num_steps": 1})
    finally:
        release()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {
        "detail": "queue full: 8191 rows admitted, this request adds 2, the limit is 8192 "
        "(FLOW_MAX_QUEUE_ROWS); retry later"
    }
    assert post_ok(client, "/sample", {"num_samples": 2, "num_steps": 1})


def test_a_passed_deadline_is_504(client: TestClient) -> None:
    response = client.post("/sample", json={"num_samples": 2, "num_steps": 50, "timeout_s": 1e-9})
    assert response.status_code == 504
    assert response.json() == {
        "detail": "timeout_s: no answer within 1e-09 s; the work was stopped"
    }


def test_a_model_that_returns_nan_is_500_and_counted(client: TestClient) -> None:
    before = metric(client, "flowserve_nonfinite_answers_total", model="nan")
    response = client.post("/sample", json={"model": "nan", "num_samples": 2, "num_steps": 4})
    assert response.status_code == 500
    assert response.json() == {
        "detail": "model nan produced non-finite values (NaN or infinity) for this request; "
        "no data was returned"
    }
    assert metric(client, "flowserve_nonfinite_answers_total", model="nan") == before + 1


def test_not_ready_is_503(client: TestClient) -> None:
    registry = client.app.state.registry
    registry.ready = False
    try:
        ready = client.get("/readyz")
        sample = client.post("/sample", json={"num_samples": 1})
        model = client.get("/models/tiny")
        health = client.get("/healthz")
    finally:
        registry.ready = True
    for response in (ready, sample, model):
        assert response.status_code == 503
        assert response.json() == {"detail": "not ready: models are loading"}
        assert response.headers["retry-after"] == "1"
    assert health.status_code == 200


# ------------------------------------------------------------------- other endpoints


def test_models_lists_the_manifests(client: TestClient, models_dir: Path) -> None:
    response = client.get("/models")
    assert response.status_code == 200
    manifests = [
        json.loads((models_dir / name / "manifest.json").read_text())
        for name in ("nan", "odd", "post", "tiny")
    ]
    assert response.json() == {"models": manifests}
    one = client.get("/models/odd")
    assert (one.status_code, one.json()) == (200, manifests[1])
    missing = client.get("/models/nope")
    # One message for every 404 of a model name, GET or POST.
    detail = "model: unknown model 'nope'; loaded: nan, odd, post, tiny"
    assert (missing.status_code, missing.json()) == (404, {"detail": detail})
    posted = client.post("/sample", json={"model": "nope", "num_samples": 1})
    assert (posted.status_code, posted.json()) == (404, {"detail": detail})


def test_health_and_readiness(client: TestClient) -> None:
    assert (client.get("/healthz").status_code, client.get("/healthz").json()) == (
        200,
        {"status": "ok"},
    )
    ready = client.get("/readyz")
    assert (ready.status_code, ready.json()) == (
        200,
        {"status": "ready", "models": ["nan", "odd", "post", "tiny"]},
    )


def test_encode_inverts_the_closed_form(client: TestClient) -> None:
    x = [[1.0, -2.0], [3.0, 0.5]]
    response = post_ok(client, "/encode", {"model": "tiny", "x": x, "num_steps": 5})
    body = response.json()
    # Backward Euler on v = x / 2 multiplies by (1 - 1 / (2K)) per step.
    np.testing.assert_allclose(body["latents"], np.array(x) * (1 - 0.5 / 5) ** 5, rtol=1e-6)
    assert (body["nfe"], body["dim"]) == (5, 2)
    latents = npy(post_ok(client, "/encode", {"model": "tiny", "x": x, "num_steps": 5}, Accept=NPY))
    np.testing.assert_allclose(latents, body["latents"], rtol=1e-6)


def test_log_prob_of_the_linear_field(client: TestClient) -> None:
    # div v = a d = 1 everywhere, so log p1(x) = log p0(latent) - 1 exactly.
    x = [[1.0, -2.0], [0.0, 0.5]]
    body = post_ok(client, "/log_prob", {"model": "tiny", "x": x, "num_steps": 4}).json()
    latents = np.array(x) * (1 - 0.5 / 4) ** 4
    np.testing.assert_allclose(body["latents"], latents, rtol=1e-6)
    log_p0 = multivariate_normal(mean=[0, 0], cov=np.eye(2)).logpdf(latents)
    np.testing.assert_allclose(body["log_prob"], log_p0 - 1.0, rtol=1e-6)
    assert body["divergence"] == "exact"


def test_metrics_count_requests_rows_and_samples(client: TestClient) -> None:
    before_ok = metric(client, "flowserve_requests_total", endpoint="/sample", status="200")
    before_bad = metric(client, "flowserve_requests_total", endpoint="/sample", status="422")
    before_samples = metric(client, "flowserve_samples_total", model="post")
    post_ok(client, "/sample", {"model": "post", "num_samples": 13, "num_steps": 3})
    client.post("/sample", json={"num_samples": 0})
    text = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    for name in (
        "flowserve_requests_total",
        "flowserve_request_duration_seconds",
        "flowserve_forward_pass_rows",
        "flowserve_queue_rows",
        "flowserve_queue_requests",
        "flowserve_samples_total",
        "flowserve_nonfinite_answers_total",
        "flowserve_rows_dropped_total",
    ):
        assert f"# TYPE {name} " in text
    assert metric(client, "flowserve_requests_total", endpoint="/sample", status="200") == (
        before_ok + 1
    )
    assert metric(client, "flowserve_requests_total", endpoint="/sample", status="422") == (
        before_bad + 1
    )
    assert metric(client, "flowserve_samples_total", model="post") == before_samples + 13
    assert metric(client, "flowserve_forward_pass_rows_count", model="post") > 0
    assert metric(client, "flowserve_request_duration_seconds_count", endpoint="/sample") > 0
    assert metric(client, "flowserve_queue_rows", model="post") == 0
    assert metric(client, "flowserve_queue_requests", model="post") == 0


def test_openapi_documents_examples_and_errors(client: TestClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path in ("/sample", "/trajectory", "/encode", "/log_prob"):
        operation = spec["paths"][path]["post"]
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        examples = schemas[ref.rsplit("/", 1)[1]]["examples"]
        assert examples, path
        for status in ("401", "404", "413", "422", "503"):
            error = operation["responses"][status]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)
        # Each example of an unconditional model is a request the service answers (with a model
        # it has); those of conditional models are tried in test_conditional.
        for example in examples:
            if example["model"] != "four-gaussians":
                continue
            response = client.post(path, json={**example, "model": "post"})
            assert response.status_code == 200, (path, response.text)
    for path in ("/sample", "/trajectory", "/encode"):
        assert NPY in spec["paths"][path]["post"]["responses"]["200"]["content"]


# ------------------------------------------------------------------- another architecture


def test_another_architecture_starts_from_its_manifest_source(client: TestClient) -> None:
    n = 4000
    request = {"model": "odd", "num_samples": n, "num_steps": 1, "seed": 21}
    body = post_ok(client, "/trajectory", {**request, "stride": 1}).json()
    assert body["dim"] == 3
    start = np.asarray(body["trajectory"][0], dtype=np.float64)
    w = np.array(ODD_SOURCE["weights"])
    mu, covs = np.array(ODD_SOURCE["means"]), np.array(ODD_SOURCE["covs"])
    mean = w @ mu
    cov = np.einsum("k,kij->ij", w, covs + np.einsum("ki,kj->kij", mu, mu)) - np.outer(mean, mean)
    mean_se = np.sqrt(np.diag(cov) / n)
    assert (np.abs(start.mean(0) - mean) < 5 * mean_se).all()
    cov_se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    assert (np.abs(np.cov(start.T) - cov) < 6 * cov_se).all()
    # The two components are told apart by the first coordinate: weights 0.3 / 0.7.
    assert (start[:, 0] > -0.5).mean() == pytest.approx(0.3, abs=0.04)
    # And the samples are the Euler step from those very points.
    samples = post_ok(client, "/sample", request).json()["samples"]
    np.testing.assert_allclose(samples, body["trajectory"][-1], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- auth


def test_an_api_key_guards_everything_but_health(tmp_path: Path) -> None:
    write_model_dir(tmp_path, "tiny")
    with serving(tmp_path, api_key="first, second") as guarded:
        refused = guarded.post("/sample", json={"num_samples": 1})
        assert refused.status_code == 401
        assert refused.json() == {
            "detail": "authorization: a valid 'Authorization: Bearer <key>' header is required"
        }
        assert refused.headers["www-authenticate"] == 'Bearer realm="flowserve"'
        wrong = guarded.get("/models", headers={"Authorization": "Bearer third"})
        assert wrong.status_code == 401
        ok = guarded.post(
            "/sample", json={"num_samples": 1}, headers={"Authorization": "Bearer second"}
        )
        assert ok.status_code == 200
        assert guarded.get("/healthz").status_code == 200
        assert guarded.get("/readyz").status_code == 200
        assert guarded.get("/metrics").status_code == 401


def test_without_a_default_the_first_model_in_name_order_serves(tmp_path: Path) -> None:
    write_model_dir(tmp_path, "zeta", a=1.0)
    write_model_dir(tmp_path, "alpha", a=0.0)
    with serving(tmp_path) as plain:
        body = post_ok(plain, "/sample", {"x0": [[1.0, 2.0]], "num_steps": 2}).json()
    assert body["model"] == "alpha"
    assert body["samples"] == [[1.0, 2.0]]


# ------------------------------------------------------------------- concurrency


def concurrent_requests() -> list[tuple[str, dict]]:
    requests = []
    for i in range(32):
        body = {
            "model": "post",
            "num_samples": 8 + 5 * (i % 7),
            "num_steps": 20 + 7 * (i % 5),
            "seed": 1000 + i,
            "solver": ("euler", "euler", "midpoint", "rk4")[i % 4],
        }
        if i % 3 == 0:
            requests.append(("/trajectory", {**body, "stride": 1 + i % 4}))
        else:
            requests.append(("/sample", body))
    return requests


async def test_concurrent_requests_are_batched_and_answer_as_alone(models_dir: Path) -> None:
    app = create_app(Settings(models_dir=models_dir, device="cpu", **LIMITS))
    transport = httpx.ASGITransport(app=app)
    # ASGITransport sends no lifespan events: run the app's lifespan around the client.
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://flow.test") as http,
    ):
        deadline = time.monotonic() + 60
        while (await http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "app not ready"
            await asyncio.sleep(0.02)
        requests = concurrent_requests()
        together = await asyncio.gather(*(http.post(p, json=b) for p, b in requests))
        alone = [await http.post(p, json=b) for p, b in requests]
        again = [await http.post(p, json=b) for p, b in requests]
        stats = app.state.registry.served["post"].engine.stats
    for (path, _), a, b, c in zip(requests, together, alone, again, strict=True):
        assert a.status_code == b.status_code == c.status_code == 200, a.text
        key = "trajectory" if path == "/trajectory" else "samples"
        # Batched passes may take other kernels (fused ones from 128 rows up) than a request's
        # own passes, so the last float32 bits may differ; alone, these requests (under 128
        # rows) run the same unfused passes each time, bit for bit.
        np.testing.assert_allclose(a.json()[key], b.json()[key], rtol=1e-5, atol=1e-5)
        assert b.json()[key] == c.json()[key]
    assert stats.max_jobs_in_pass > 1
    assert stats.jobs_done == 3 * len(requests)
