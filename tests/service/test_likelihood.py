"""POST /encode and POST /log_prob (`service.sampling.encode`, `log_prob`).

Answers are checked against closed forms (v = a x maps N(m, S) to N(e^a m, e^2a S); linear
fields have divergence trace(A); rotations have divergence 0), against loops written here
independently of the service, and against each other (exact against Hutchinson, /encode against
/sample). Then validation, limits, .npy answers, the client and CLI on a real server, and the bars
of the bundled reference model when models/four-gaussians is there.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import (
    ENGINES,
    REPO_ROOT,
    PostFlow,
    ScaledField,
    serving,
    write_module_dir,
)
from fastapi.testclient import TestClient
from scipy.linalg import expm
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from service import cli
from service.client import AsyncFlowClient, FlowClient
from service.solvers import SOLVERS

NPY = "application/x-npy"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# `scaled`: v(t, x) = A_SCALED x with source N(MEAN, COV); x1 = e^a x0 ~ N(e^a m, e^2a S).
A_SCALED = 0.7
MEAN = np.array([1.0, -0.5])
COV = np.array([[0.8, 0.3], [0.3, 0.5]])

# `linear`: v(t, x) = LINEAR x, not symmetric, trace 0.5.
LINEAR = np.array([[0.3, -0.8, 0.1], [0.5, -0.2, 0.4], [0.0, 0.7, 0.4]])

# `rotation`: v(t, x) = OMEGA (1 + t) J x, J the quarter turn; the angle turned is 1.5 OMEGA.
OMEGA = 1.2


class LinearField(torch.nn.Module):
    """v(t, x) = x A^T: divergence trace(A) everywhere."""

    def __init__(self, matrix: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("matrix", torch.tensor(matrix, dtype=torch.float32))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.T + 0.0 * t


class RotationField(torch.nn.Module):
    """v(t, x) = omega (1 + t) (-x_2, x_1): divergence 0, angular speed growing with t."""

    def __init__(self, omega: float) -> None:
        super().__init__()
        self.omega = omega

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        turned = torch.cat([-x[:, 1:2], x[:, 0:1]], dim=1)
        return self.omega * (1.0 + t) * turned


def gaussian(mean: np.ndarray, cov: np.ndarray) -> dict:
    return {"means": [mean.tolist()], "covs": [cov.tolist()], "weights": [1.0]}


def standard(dim: int, var: float = 1.0) -> dict:
    return gaussian(np.zeros(dim), var * np.eye(dim))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("likelihood-models")
    write_module_dir(root, "scaled", ScaledField(A_SCALED), gaussian(MEAN, COV), 2)
    write_module_dir(root, "linear", LinearField(LINEAR), standard(3), 3)
    write_module_dir(root, "rotation", RotationField(OMEGA), standard(2), 2)
    for dim in (16, 17):
        write_module_dir(root, f"wide{dim}", ScaledField(0.25), standard(dim), dim)
    torch.manual_seed(0)
    write_module_dir(root, "post", PostFlow(2).eval(), standard(2, 0.5), 2)
    torch.manual_seed(1)
    write_module_dir(root, "post4", PostFlow(4).eval(), standard(4, 0.5), 4)
    return root


@pytest.fixture(scope="module", params=ENGINES)
def client(models_dir: Path, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    with serving(models_dir, request.param) as test_client:
        yield test_client


def module_of(models_dir: Path, name: str) -> torch.jit.ScriptModule:
    return torch.jit.load(str(models_dir / name / "model.pt"))


def post(client: TestClient, path: str, **body: object) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def arrays(answer: dict, *keys: str) -> list[np.ndarray]:
    return [np.asarray(answer[key], dtype=np.float64) for key in keys]


def backward_euler(module, x1: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An Euler loop written independently of the service, from t = 1 back to t = 0, with the
    divergence from the full Jacobian: for k = K .. 1, I += (1/K) tr dv/dx and x -= (1/K) v,
    both at (k/K, x). Returns (latents (n, d), integral of div v (n,)), float64."""
    x = x1.to(torch.float64)
    integral = torch.zeros(x.shape[0], dtype=torch.float64)
    h = 1.0 / num_steps
    for k in range(num_steps, 0, -1):
        t = torch.full((x.shape[0], 1), k / num_steps)
        xf = x.to(torch.float32)
        jac = torch.autograd.functional.jacobian(lambda y, t=t: module(t, y).sum(0), xf)
        integral += h * torch.einsum("ini->n", jac).to(torch.float64)
        with torch.no_grad():
            x = x - h * module(t, xf).to(torch.float64)
    return x, integral


# --------------------------------------------------------------------------------------------
# Closed form: v = a x maps N(m, S) to N(e^a m, e^2a S)


def scaled_points(n: int, seed: int) -> np.ndarray:
    """Points where the model's density is not negligible, plus one far in the tail."""
    rng = np.random.default_rng(seed)
    x0 = rng.multivariate_normal(MEAN, COV, size=n - 1)
    return np.vstack([math.exp(A_SCALED) * x0, [[6.0, -5.0]]])


def test_log_prob_of_a_scaled_gaussian_is_the_pushed_forward_density(client: TestClient) -> None:
    x1 = scaled_points(8, seed=0)
    answer = post(client, "/log_prob", model="scaled", x=x1.tolist(), num_steps=1000)
    log_prob, log_p0, integral, latents = arrays(
        answer, "log_prob", "log_p0", "divergence_integral", "latents"
    )
    a = A_SCALED
    truth = multivariate_normal(math.exp(a) * MEAN, math.exp(2 * a) * COV).logpdf(x1)
    np.testing.assert_allclose(log_prob, truth, atol=1e-2)
    # The parts: div v = 2a everywhere, and log p0 is the source's density at the latents.
    np.testing.assert_allclose(integral, 2 * a, rtol=1e-5)
    np.testing.assert_allclose(log_p0, multivariate_normal(MEAN, COV).logpdf(latents), rtol=1e-6)
    np.testing.assert_allclose(log_prob, log_p0 - integral, rtol=1e-12)
    assert (answer["divergence"], answer["num_probes"], answer["seed"]) == ("exact", None, None)
    assert answer["divergence_stderr"] is None
    assert (answer["num_samples"], answer["dim"], answer["nfe"]) == (8, 2, 1000)


@pytest.mark.parametrize("num_steps", [10, 100, 1000])
def test_encode_of_a_scaled_field_is_backward_euler(client: TestClient, num_steps: int) -> None:
    x1 = scaled_points(6, seed=1)
    latents = np.asarray(
        post(client, "/encode", model="scaled", x=x1.tolist(), num_steps=num_steps)["latents"]
    )
    # Each backward Euler step multiplies by (1 - a/K).
    euler = (1 - A_SCALED / num_steps) ** num_steps * x1
    np.testing.assert_allclose(latents, euler, rtol=2e-5)
    # (1 - a/K)^K = e^-a exp(-a^2/2K - ...): Euler misses e^-a x1 by about e^-a a^2/2K |x1|.
    exact = math.exp(-A_SCALED) * x1
    bound = math.exp(-A_SCALED) * A_SCALED**2 / num_steps * np.abs(x1) + 1e-5
    assert (np.abs(latents - exact) <= bound).all()


# --------------------------------------------------------------------------------------------
# Divergence of known fields


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_linear_field_integrates_its_trace(client: TestClient, solver: str) -> None:
    x1 = np.random.default_rng(2).normal(size=(5, 3))
    answer = post(client, "/log_prob", model="linear", x=x1.tolist(), num_steps=20, solver=solver)
    log_prob, log_p0, integral, latents = arrays(
        answer, "log_prob", "log_p0", "divergence_integral", "latents"
    )
    # A constant divergence is integrated exactly by every Runge-Kutta method.
    np.testing.assert_allclose(integral, np.trace(LINEAR), rtol=1e-5)
    np.testing.assert_allclose(log_p0, multivariate_normal(np.zeros(3)).logpdf(latents))
    np.testing.assert_allclose(log_prob, log_p0 - np.trace(LINEAR), rtol=1e-6)
    if solver == "euler":
        step = np.linalg.matrix_power(np.eye(3) - LINEAR / 20, 20)
        np.testing.assert_allclose(latents, x1 @ step.T, rtol=1e-5, atol=1e-6)
    if solver == "rk4":
        np.testing.assert_allclose(latents, x1 @ expm(-LINEAR).T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("divergence", "solver"),
    [("exact", "euler"), ("exact", "rk4"), ("hutchinson", "euler"), ("hutchinson", "heun")],
)
def test_rotation_has_zero_divergence(client: TestClient, divergence: str, solver: str) -> None:
    x1 = np.random.default_rng(3).normal(size=(6, 2))
    extra = {"num_probes": 4, "seed": 5} if divergence == "hutchinson" else {}
    answer = post(
        client, "/log_prob", model="rotation", x=x1.tolist(), num_steps=40, solver=solver,
        divergence=divergence, **extra,
    )  # fmt: skip
    log_prob, log_p0, integral = arrays(answer, "log_prob", "log_p0", "divergence_integral")
    np.testing.assert_array_equal(integral, 0.0)
    np.testing.assert_array_equal(log_prob, log_p0)
    if divergence == "hutchinson":
        # A probe sees e^T J e = 0 for an antisymmetric J: every probe agrees, no error.
        np.testing.assert_array_equal(answer["divergence_stderr"], 0.0)
    if solver == "rk4":
        # The latent is x1 turned back by 1.5 omega, and the source is rotation invariant.
        angle = -1.5 * OMEGA
        turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        np.testing.assert_allclose(answer["latents"], x1 @ turn.T, atol=1e-5)
        np.testing.assert_allclose(log_prob, multivariate_normal(np.zeros(2)).logpdf(x1), atol=1e-5)


def test_log_prob_of_a_network_matches_an_independent_euler_loop(
    client: TestClient, models_dir: Path
) -> None:
    x1 = np.random.default_rng(4).normal(size=(8, 2)).astype(np.float32)
    answer = post(client, "/log_prob", model="post", x=x1.tolist(), num_steps=20)
    latents, integral = backward_euler(module_of(models_dir, "post"), torch.from_numpy(x1), 20)
    np.testing.assert_allclose(answer["latents"], latents.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(answer["divergence_integral"], integral.numpy(), atol=1e-5)
    log_p0 = multivariate_normal(np.zeros(2), 0.5 * np.eye(2)).logpdf(answer["latents"])
    np.testing.assert_allclose(answer["log_prob"], log_p0 - integral.numpy(), atol=1e-4)


@pytest.mark.parametrize(("model", "method"), [("wide16", "exact"), ("wide17", "hutchinson")])
def test_default_divergence_is_exact_up_to_the_dimension_limit(
    client: TestClient, model: str, method: str
) -> None:
    dim = int(model.removeprefix("wide"))
    answer = post(client, "/log_prob", model=model, x=[[0.5] * dim], num_steps=4, seed=3)
    assert answer["divergence"] == method
    assert answer["num_probes"] == (1 if method == "hutchinson" else None)
    assert answer["seed"] == (3 if method == "hutchinson" else None)
    # v = a x: every Rademacher probe sees e^T (a I) e = a d, so both methods are exact here.
    np.testing.assert_allclose(answer["divergence_integral"], 0.25 * dim, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Hutchinson against exact


def test_hutchinson_agrees_with_exact_within_its_standard_error(client: TestClient) -> None:
    x1 = np.random.default_rng(5).normal(size=(24, 4)).tolist()
    common = {"model": "post4", "x": x1, "num_steps": 20}
    exact = post(client, "/log_prob", **common)
    hutch = post(client, "/log_prob", **common, divergence="hutchinson", num_probes=64, seed=11)
    assert (hutch["divergence"], hutch["num_probes"], hutch["seed"]) == ("hutchinson", 64, 11)
    # The probes do not change the path: same latents, same log p0.
    np.testing.assert_array_equal(hutch["latents"], exact["latents"])
    np.testing.assert_array_equal(hutch["log_p0"], exact["log_p0"])
    stderr = np.asarray(hutch["divergence_stderr"])
    assert (stderr > 0).all()
    z = (np.asarray(hutch["divergence_integral"]) - exact["divergence_integral"]) / stderr
    assert np.abs(z).max() < 5, z
    # A standard error off by a large factor either way shows in the mean square of z (about 1).
    assert 0.3 < float(np.mean(z**2)) < 3, z
    np.testing.assert_allclose(
        hutch["log_prob"], np.asarray(hutch["log_p0"]) - hutch["divergence_integral"], rtol=1e-12
    )


def test_hutchinson_is_seeded(client: TestClient) -> None:
    common = {
        "model": "post4", "x": np.random.default_rng(6).normal(size=(5, 4)).tolist(),
        "num_steps": 5, "divergence": "hutchinson", "num_probes": 3,
    }  # fmt: skip
    first, again = (post(client, "/log_prob", **common, seed=21) for _ in range(2))
    other = post(client, "/log_prob", **common, seed=22)
    assert first == again
    assert first["divergence_integral"] != other["divergence_integral"]
    unseeded = post(client, "/log_prob", **common)
    assert isinstance(unseeded["seed"], int)
    assert post(client, "/log_prob", **common, seed=unseeded["seed"]) == unseeded


def test_one_probe_reports_no_standard_error(client: TestClient) -> None:
    answer = post(
        client, "/log_prob", model="post4", x=[[0.1, 0.2, 0.3, 0.4]], num_steps=3,
        divergence="hutchinson",
    )  # fmt: skip
    assert (answer["num_probes"], answer["divergence_stderr"]) == (1, None)


# --------------------------------------------------------------------------------------------
# Round trip: /encode undoes /sample


def round_trip_error(client: TestClient, start: str, solver: str) -> float:
    """Mean distance between start points and /encode of their /sample, 100 steps."""
    common = {"model": "post", "num_steps": 100, "solver": solver}
    if start == "x0":
        x0 = np.random.default_rng(7).normal(scale=math.sqrt(0.5), size=(64, 2))
        x1 = post(client, "/sample", **common, x0=x0.tolist())["samples"]
    else:
        path = post(client, "/trajectory", **common, num_samples=64, seed=8, stride=100)
        assert path["times"] == [0.0, 1.0]
        x0, x1 = np.asarray(path["trajectory"][0]), path["trajectory"][1]
    latents = np.asarray(post(client, "/encode", **common, x=x1)["latents"])
    return float(np.linalg.norm(latents - x0, axis=1).mean())


@pytest.mark.parametrize("start", ["x0", "seed"])
def test_encode_returns_the_start_points_of_samples(client: TestClient, start: str) -> None:
    euler = round_trip_error(client, start, "euler")
    rk4 = round_trip_error(client, start, "rk4")
    assert 0 < euler < 0.1
    assert rk4 < euler / 10


def test_encode_matches_an_independent_euler_loop(client: TestClient, models_dir: Path) -> None:
    x1 = np.random.default_rng(9).normal(size=(10, 2)).astype(np.float32)
    latents = post(client, "/encode", model="post", x=x1.tolist(), num_steps=25)["latents"]
    expected, _ = backward_euler(module_of(models_dir, "post"), torch.from_numpy(x1), 25)
    np.testing.assert_allclose(latents, expected.numpy(), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Batching: likelihood passes share the engine


async def test_concurrent_log_probs_share_passes_and_keep_their_answers(
    client: TestClient,
) -> None:
    if client.app.state.settings.engine_address:
        pytest.skip("resets the in-process engine's counters; test_engine_process proves batching")
    engine = client.app.state.registry.served["post"].engine
    bodies = [
        {"model": "post", "x": [[0.5, -0.5], [1.0, 2.0]], "num_steps": 400},
        {"model": "post", "x": [[-1.0, 0.0]], "num_steps": 50, "solver": "midpoint"},
    ]
    alone = [post(client, "/log_prob", **body) for body in bodies]
    engine.stats.max_jobs_in_pass = 0
    transport = httpx.ASGITransport(app=client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as aclient:
        together = await asyncio.gather(*(aclient.post("/log_prob", json=b) for b in bodies))
    assert [r.status_code for r in together] == [200, 200]
    assert engine.stats.max_jobs_in_pass == 2
    # Sharing passes changes no number.
    assert [r.json() for r in together] == alone


# --------------------------------------------------------------------------------------------
# Validation (422), limits (413), .npy answers


@pytest.mark.parametrize("path", ["/encode", "/log_prob"])
@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"x": [[1.0, 2.0, 3.0]]}, "x: points have 3 coordinates; model scaled has dim 2"),
        (
            {"x": [[1.0], [1.0, 2.0]]},
            "x: rows must all have the same length; row 0 has 1, row 1 has 2",
        ),
        ({"x": []}, "x: must hold at least one point"),
        ({"x": [[1.0, float("nan")]]}, "x[0][1]: Input should be a finite number"),
        ({"x": [[float("-inf"), 1.0]]}, "x[0][0]: Input should be a finite number"),
        (
            {"x": [[1.0, 1e39]]},
            "x: coordinates must lie within +-1e+06 (FLOW_MAX_ABS_INPUT); got inf",
        ),
        (
            {"x": [[1.0, 2.0]], "num_steps": 0},
            "num_steps: Input should be greater than or equal to 1",
        ),
        (
            {"x": [[1.0, 2.0]], "solver": "leapfrog"},
            "solver: Input should be 'euler', 'midpoint', 'heun' or 'rk4'",
        ),
    ],
)
def test_invalid_points_are_422(client: TestClient, path: str, body: dict, detail: str) -> None:
    # json.dumps writes NaN and Infinity tokens, as some clients do; the server must refuse them.
    content = json.dumps({"model": "scaled", **body})
    response = client.post(path, content=content, headers={"Content-Type": "application/json"})
    assert (response.status_code, response.json()) == (422, {"detail": detail})


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"divergence": "trace"}, "divergence: Input should be 'exact' or 'hutchinson'"),
        (
            {"divergence": "exact", "num_probes": 4},
            "num_probes: only applies to divergence 'hutchinson'",
        ),
        (
            {"num_probes": 4},
            "num_probes: only applies to divergence 'hutchinson'; model scaled (dim 2) defaults "
            "to 'exact' (up to dim 16, FLOW_MAX_EXACT_DIVERGENCE_DIM)",
        ),
        (
            {"divergence": "hutchinson", "num_probes": 0},
            "num_probes: Input should be greater than or equal to 1",
        ),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ],
)
def test_invalid_divergence_options_are_422(client: TestClient, body: dict, detail: str) -> None:
    response = client.post("/log_prob", json={"model": "scaled", "x": [[1.0, 2.0]], **body})
    assert (response.status_code, response.json()) == (422, {"detail": detail})


def test_encode_takes_no_divergence_options(client: TestClient) -> None:
    response = client.post("/encode", json={"model": "scaled", "x": [[1.0, 2.0]], "seed": 1})
    assert (response.status_code, response.json()) == (
        422,
        {"detail": "seed: Extra inputs are not permitted"},
    )


@pytest.mark.parametrize("path", ["/encode", "/log_prob"])
def test_unknown_model_is_404(client: TestClient, path: str) -> None:
    response = client.post(path, json={"model": "nope", "x": [[1.0, 2.0]]})
    assert response.status_code == 404
    assert "nope" in response.json()["detail"]


LIMITS = {
    "max_samples": 8,
    "max_steps": 50,
    "max_row_steps": 400,
    "max_divergence_row_steps": 200,
    "max_probes": 4,
    "max_probe_values": 16,
    "max_exact_divergence_dim": 2,
}


@pytest.fixture(scope="module")
def limited(models_dir: Path) -> Iterator[TestClient]:
    with serving(models_dir, **LIMITS) as test_client:
        yield test_client


def over(field: str, value: int, limit: int, setting: str) -> str:
    return f"{field}: {value} is over the limit of {limit} ({setting})"


@pytest.mark.parametrize(
    ("path", "body", "detail"),
    [
        ("/encode", {"rows": 9}, over("x", 9, 8, "FLOW_MAX_SAMPLES")),
        ("/log_prob", {"rows": 9}, over("x", 9, 8, "FLOW_MAX_SAMPLES")),
        ("/encode", {"num_steps": 51}, over("num_steps", 51, 50, "FLOW_MAX_STEPS")),
        (
            "/encode",
            {"rows": 4, "num_steps": 26, "solver": "rk4"},
            over("x x nfe", 416, 400, "FLOW_MAX_ROW_STEPS"),
        ),
        # Exact divergence: rows x nfe x d, here 6 x 20 x 2.
        (
            "/log_prob",
            {"rows": 6, "num_steps": 20},
            over("x rows x nfe x divergence passes", 240, 200, "FLOW_MAX_DIVERGENCE_ROW_STEPS"),
        ),
        (
            "/log_prob",
            {"rows": 3, "num_steps": 17, "solver": "heun"},
            over("x rows x nfe x divergence passes", 204, 200, "FLOW_MAX_DIVERGENCE_ROW_STEPS"),
        ),
        # Hutchinson: rows x nfe x probes, here 1 x 70 x 3.
        (
            "/log_prob",
            {"num_steps": 35, "solver": "heun", "divergence": "hutchinson", "num_probes": 3},
            over("x rows x nfe x divergence passes", 210, 200, "FLOW_MAX_DIVERGENCE_ROW_STEPS"),
        ),
        (
            "/log_prob",
            {"num_steps": 10, "divergence": "hutchinson", "num_probes": 5},
            over("num_probes", 5, 4, "FLOW_MAX_PROBES"),
        ),
        # The probes are held in memory: rows x probes x d, here 3 x 3 x 2, whatever the steps.
        (
            "/log_prob",
            {"rows": 3, "num_steps": 1, "divergence": "hutchinson", "num_probes": 3},
            over("x rows x num_probes x dim", 18, 16, "FLOW_MAX_PROBE_VALUES"),
        ),
    ],
)
def test_limits_are_413(limited: TestClient, path: str, body: dict, detail: str) -> None:
    rows = body.pop("rows", 1)
    response = limited.post(path, json={"model": "scaled", "x": [[1.0, 2.0]] * rows, **body})
    assert (response.status_code, response.json()) == (413, {"detail": detail})


@pytest.mark.parametrize(
    ("body", "method"),
    [
        ({"rows": 5, "num_steps": 20}, "exact"),  # 5 x 20 x 2 = 200: at the limit
        # 2 x 25 x 4 probes = 200 passes; 2 x 4 x 2 = 16 probe values: both at their limits
        ({"rows": 2, "num_steps": 25, "divergence": "hutchinson", "num_probes": 4}, "hutchinson"),
    ],
)
def test_work_at_the_limit_is_served(limited: TestClient, body: dict, method: str) -> None:
    rows = body.pop("rows")
    answer = post(limited, "/log_prob", model="scaled", x=[[1.0, 2.0]] * rows, **body)
    assert (answer["divergence"], len(answer["log_prob"])) == (method, rows)


def test_dimension_counts_in_the_exact_work_and_sets_the_default(limited: TestClient) -> None:
    """`linear` has dim 3 > FLOW_MAX_EXACT_DIVERGENCE_DIM = 2: it defaults to one Hutchinson probe;
    with exact divergence 4 rows x 20 steps cost 3 passes each, 240 > 200, where `scaled` (dim 2)
    costs 160."""
    x3, x2 = np.ones((4, 3)).tolist(), np.ones((4, 2)).tolist()
    answer = post(limited, "/log_prob", model="linear", x=x3, num_steps=20, seed=0)
    assert (answer["divergence"], answer["num_probes"]) == ("hutchinson", 1)
    answer = post(limited, "/log_prob", model="scaled", x=x2, num_steps=20, divergence="exact")
    assert answer["divergence"] == "exact"
    response = limited.post(
        "/log_prob", json={"model": "linear", "x": x3, "num_steps": 20, "divergence": "exact"}
    )
    detail = over("x rows x nfe x divergence passes", 240, 200, "FLOW_MAX_DIVERGENCE_ROW_STEPS")
    assert (response.status_code, response.json()) == (413, {"detail": detail})


def test_encode_answers_npy(client: TestClient) -> None:
    body = {"model": "scaled", "x": scaled_points(4, seed=10).tolist(), "num_steps": 7}
    response = client.post("/encode", json=body, headers={"Accept": NPY})
    assert response.status_code == 200
    assert response.headers["content-type"] == NPY
    assert response.headers["x-flow-model"] == "scaled"
    assert (response.headers["x-flow-num-steps"], response.headers["x-flow-nfe"]) == ("7", "7")
    assert response.headers["x-flow-solver"] == "euler"
    array = np.load(io.BytesIO(response.content))
    assert (array.dtype, array.shape) == (np.float32, (4, 2))
    latents = np.asarray(post(client, "/encode", **body)["latents"], dtype=np.float32)
    np.testing.assert_array_equal(array, latents)


def test_log_prob_answers_json_with_headers(client: TestClient) -> None:
    body = {"model": "post4", "x": [[0.0] * 4], "num_steps": 2, "divergence": "hutchinson"}
    response = client.post("/log_prob", json={**body, "seed": 4}, headers={"Accept": NPY})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-flow-seed"] == "4"
    assert response.headers["x-flow-nfe"] == "2"


# --------------------------------------------------------------------------------------------
# Client and CLI against a real server: conftest's `tiny`, v = TINY_A x, source N(0, I_2)

TINY_A = 0.5


def tiny_log_prob(x: np.ndarray, num_steps: int) -> np.ndarray:
    """The answer for `tiny` at K Euler steps: latents (1 - a/K)^K x under N(0, I), minus 2a."""
    latents = (1 - TINY_A / num_steps) ** num_steps * np.asarray(x, dtype=np.float64)
    return multivariate_normal(np.zeros(2)).logpdf(latents) - 2 * TINY_A


@pytest.mark.e2e
async def test_clients_encode_and_log_prob_on_a_real_server(server_url: str) -> None:
    x = np.random.default_rng(12).normal(size=(5, 2)).astype(np.float32)
    with FlowClient(server_url) as sync_client:
        latents = sync_client.encode(model="tiny", x=x, num_steps=10, solver="rk4")
        exact = sync_client.log_prob(model="tiny", x=x, num_steps=10)
    async with AsyncFlowClient(server_url) as async_client:
        hutch = await async_client.log_prob(
            model="tiny", x=x, num_steps=10, divergence="hutchinson", num_probes=8, seed=3
        )
    assert (latents.dtype, latents.shape) == (np.float32, (5, 2))
    np.testing.assert_allclose(latents, math.exp(-TINY_A) * x, rtol=1e-5)
    for answer in (exact, hutch):
        assert answer["latents"].shape == (5, 2)
        assert {answer[key].shape for key in ("log_prob", "log_p0", "divergence_integral")} == {
            (5,)
        }
        np.testing.assert_allclose(answer["log_prob"], tiny_log_prob(x, 10), rtol=1e-5)
    assert exact["divergence_stderr"] is None
    # Every probe of a scaled identity sees the same divergence: no spread.
    np.testing.assert_array_equal(hutch["divergence_stderr"], np.zeros(5))


@pytest.mark.e2e
def test_cli_log_prob_of_points_and_on_a_grid(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.random.default_rng(13).normal(size=(7, 2))
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    common = ["--url", server_url, "--model", "tiny", "--num-steps", "8"]
    code = cli.main(
        ["log-prob", *common, "--x", str(tmp_path / "x.csv"), "--out", str(tmp_path / "lp.npy")]
    )
    assert (code, capsys.readouterr().err) == (0, "")
    np.testing.assert_allclose(np.load(tmp_path / "lp.npy"), tiny_log_prob(x, 8), rtol=1e-5)

    heat, grid = tmp_path / "heat.png", tmp_path / "grid.npy"
    code = cli.main([
        "log-prob", "--grid", *common, "--divergence", "hutchinson", "--num-probes", "2",
        "--seed", "1", "--resolution", "32", "--extent", "-6", "6", "-5", "5",
        "--samples", str(tmp_path / "x.csv"), "--plot", str(heat), "--out", str(grid),
    ])  # fmt: skip
    stdout, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert heat.read_bytes().startswith(PNG_MAGIC)
    density = np.load(grid)
    assert density.shape == (32, 32)
    # Row i is y = ymin + (i + 1/2) hy, column j is x = xmin + (j + 1/2) hx (the midpoint rule).
    xs, ys = -6 + 12 / 32 * (np.arange(32) + 0.5), -5 + 10 / 32 * (np.arange(32) + 0.5)
    points = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    expected = np.exp(tiny_log_prob(points, 8)).reshape(32, 32)
    np.testing.assert_allclose(density, expected, rtol=1e-4, atol=1e-12)
    mass = float(stdout.split("integrated mass")[1].split()[0])
    assert mass == pytest.approx(density.sum() * (12 / 32) * (10 / 32), abs=1e-4)


# --------------------------------------------------------------------------------------------
# The bundled reference model: bars at 100 Euler steps (full sizes: bench/likelihood.py)

REFERENCE = REPO_ROOT / "models" / "four-gaussians"
TARGET_MEANS = np.array([[4.0, 4.0], [-4.0, 4.0], [-4.0, -4.0], [4.0, -4.0]])
TARGET_VAR = 0.5


def target_sample(n: int, seed: int) -> np.ndarray:
    """Draws from the reference target: 4 Gaussians at (+-4, +-4), cov 0.5 I, weights 1/4."""
    rng = np.random.default_rng(seed)
    component = rng.integers(0, 4, size=n)
    return TARGET_MEANS[component] + math.sqrt(TARGET_VAR) * rng.standard_normal((n, 2))


def target_log_prob(x: np.ndarray) -> np.ndarray:
    terms = [multivariate_normal(m, TARGET_VAR * np.eye(2)).logpdf(x) for m in TARGET_MEANS]
    return logsumexp(np.stack(terms, axis=1), axis=1) - math.log(4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    if not (REFERENCE / "manifest.json").is_file():
        pytest.skip(
            "models/four-gaussians is not there: train it with python -m training.train "
            "--config training/configs/four-gaussians.json --out models/four-gaussians"
        )
    # Served alone, from a copy, so other folders under models/ cannot change the answers.
    root = tmp_path_factory.mktemp("reference")
    shutil.copytree(REFERENCE, root / REFERENCE.name)
    with serving(root) as test_client:
        yield test_client


def test_reference_mean_log_prob_is_the_targets(reference: TestClient) -> None:
    """KL(target || model) = E_target[log p_target - log p_model] <= 0.05 nats."""
    x = target_sample(2000, seed=14)
    answer = post(reference, "/log_prob", model="four-gaussians", x=x.tolist(), num_steps=100)
    gap = target_log_prob(x) - np.asarray(answer["log_prob"])
    assert abs(gap.mean()) <= 0.05
    # Well separated components: the target's mean log-density is -(log 4 + 1 + log(2 pi 0.5)).
    # The same bar against that number, allowing for the Monte Carlo error of 2,000 points.
    entropy = math.log(4) + 1 + math.log(2 * math.pi * TARGET_VAR)
    model_log_prob = np.asarray(answer["log_prob"])
    allowance = 3 * model_log_prob.std() / math.sqrt(len(x))
    assert abs(model_log_prob.mean() + entropy) <= 0.05 + allowance


def test_reference_density_integrates_to_one(reference: TestClient) -> None:
    """The model density over [-8, 8]^2 by the midpoint rule: 1 +- 0.05.

    The grid hardly matters (measured: 1.0332 on 50 x 50, 1.0335 on 100 x 100, 1.0334 on
    200 x 200); the excess over 1 is Euler's O(1/K) (1.0033 at 1,000 steps)."""
    n, h = 50, 16 / 50
    centres = -8 + h * (np.arange(n) + 0.5)
    points = np.stack(np.meshgrid(centres, centres), axis=-1).reshape(-1, 2)
    answer = post(reference, "/log_prob", model="four-gaussians", x=points.tolist(), num_steps=100)
    mass = float(np.exp(answer["log_prob"]).sum() * h * h)
    assert mass == pytest.approx(1.0, abs=0.05)


def test_reference_round_trip(reference: TestClient) -> None:
    errors = {}
    for solver in ("euler", "rk4"):
        common = {"model": "four-gaussians", "num_steps": 100, "solver": solver}
        path = post(reference, "/trajectory", **common, num_samples=500, seed=15, stride=100)
        latents = post(reference, "/encode", **common, x=path["trajectory"][1])["latents"]
        errors[solver] = float(
            np.linalg.norm(np.subtract(latents, path["trajectory"][0]), axis=1).mean()
        )
    assert errors["euler"] < 0.1, errors
    assert errors["rk4"] < errors["euler"] / 10, errors
