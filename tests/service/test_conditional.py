"""Conditional and shaped models through the API: class labels, vector conditions, classifier-free
guidance, image-shaped samples, .npy requests and PNG answers.

Answers are checked against guided Euler and Runge-Kutta loops written here, independently of
the service, over the very TorchScript files it serves."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import ENGINES, REPO_ROOT, serving, write_model_dir
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

CLASSES = ["a", "b", "c"]
NULL = 3


class PerClassLinear(torch.nn.Module):
    """v(t, x, c) = s_c x + b_c t: linear per class, so guidance mixes two linear fields."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([0.5, -0.25, 1.0, 0.1]))
        self.shift = torch.nn.Parameter(
            torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0], [0.3, -0.2]])
        )

    def forward(self, t: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.scale[c].unsqueeze(1) * x + self.shift[c] * t


class TenDigits(torch.nn.Module):
    """The digits model's signature with a closed-form field: (B, 1, 8, 8) samples, classes 0-9,
    null 10; v = -s_c x + t."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(0.1, 1.1, 11))

    def forward(self, t: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return -self.scale[c].view(-1, 1, 1, 1) * x + t.view(-1, 1, 1, 1)


class VectorScaled(torch.nn.Module):
    """(x, t, c) order, t of shape (B,): v = c[:, 0] x + c[:, 1:] t."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return c[:, :1] * x + c[:, 1:] * t.unsqueeze(1)


class ImageDecay(torch.nn.Module):
    """(x, t) order, t of shape (B,), x (B, 3, 4, 5): v = -r_channel x + t."""

    def __init__(self) -> None:
        super().__init__()
        self.rate = torch.nn.Parameter(torch.tensor([0.5, 1.0, 1.5]))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -x * self.rate.view(1, 3, 1, 1) + t.view(-1, 1, 1, 1)


def write_folder(root: Path, name: str, module: torch.nn.Module, **fields: object) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module), str(folder / "model.pt"))
    dim = fields.pop("dim", 2)
    manifest = {
        "format": 1,
        "name": name,
        "dim": dim,
        "source": {"means": [[0.0] * dim], "covs": [np.eye(dim).tolist()], "weights": [1.0]},
        **fields,
        "sha256": hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest(),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def package(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "package", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("conditional-models")
    class_condition = {"kind": "class", "classes": CLASSES, "null": NULL}
    write_folder(
        root,
        "cls",
        PerClassLinear(),
        inputs=["t", "x", "c"],
        condition=class_condition,
        guidance_scale=2.0,
    )
    write_folder(
        root,
        "cls-nonull",
        PerClassLinear(),
        inputs=["t", "x", "c"],
        condition={"kind": "class", "classes": CLASSES},
    )
    write_folder(
        root,
        "vec",
        VectorScaled(),
        inputs=["x", "t", "c"],
        time_shape=[-1],
        condition={"kind": "vector", "dim": 3, "null": [0.0, 0.0, 0.0]},
    )
    write_folder(
        root,
        "ten-digits",
        TenDigits(),
        dim=64,
        shape=[1, 8, 8],
        inputs=["t", "x", "c"],
        condition={"kind": "class", "classes": [str(k) for k in range(10)], "null": 10},
        guidance_scale=1.5,
        data_range=[-1.0, 1.0],
    )
    write_model_dir(root, "tiny")
    scripted = root.parent / "image-decay.pt"
    torch.jit.save(torch.jit.script(ImageDecay()), str(scripted))
    done = package(
        str(scripted),
        "--out",
        str(root / "img"),
        "--shape",
        "3,4,5",
        "--inputs",
        "x,t",
        "--time-shape",
        "-1",
        "--data-range",
        "-2",
        "2",
    )
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="module", params=ENGINES)
def client(models_dir: Path, request: pytest.FixtureRequest):
    with serving(models_dir, request.param) as test_client:
        yield test_client


def module_of(models_dir: Path, name: str) -> torch.jit.ScriptModule:
    return torch.jit.load(str(models_dir / name / "model.pt"))


def guided_reference(
    module, x0: torch.Tensor, labels: torch.Tensor, w: float, num_steps: int, solver: str
) -> torch.Tensor:
    """Guided Euler or classic RK4 from t = 0 to 1, written out, calling the model directly."""
    null = torch.full_like(labels, NULL)

    def v(t: float, x: torch.Tensor) -> torch.Tensor:
        column = torch.full((x.shape[0], 1), t)
        conditional = module(column, x, labels)
        if w == 1:
            return conditional
        unconditional = module(column, x, null)
        return unconditional + w * (conditional - unconditional)

    x = x0.clone()
    h = 1.0 / num_steps
    with torch.no_grad():
        for k in range(num_steps):
            t = k * h
            if solver == "euler":
                x = x + h * v(t, x)
                continue
            k1 = v(t, x)
            k2 = v(t + h / 2, x + h / 2 * k1)
            k3 = v(t + h / 2, x + h / 2 * k2)
            k4 = v(t + h, x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


X0 = [[1.0, -0.5], [0.25, 2.0], [-1.5, 0.75], [0.0, 0.0]]


@pytest.mark.parametrize("solver", ["euler", "rk4"])
@pytest.mark.parametrize("w", [1.0, 2.0, 0.0, 3.5])
@pytest.mark.parametrize("labels", [[0, 1, 2, 1], ["c", "a", "b", "c"], 1])
def test_guided_answers_equal_an_independent_guided_loop(
    client: TestClient, models_dir: Path, solver: str, w: float, labels
) -> None:
    body = {"model": "cls", "x0": X0, "num_steps": 9, "solver": solver, "guidance_scale": w}
    answer = client.post("/sample", json={**body, "labels": labels})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    names = {name: i for i, name in enumerate(CLASSES)}
    rows = labels if isinstance(labels, list) else [labels] * len(X0)
    indices = [names.get(label, label) for label in rows]
    assert data["labels"] == indices
    assert data["guidance_scale"] == w
    stages = {"euler": 1, "rk4": 4}[solver]
    assert data["nfe"] == 9 * stages * (1 if w == 1 else 2)
    expected = guided_reference(
        module_of(models_dir, "cls"), torch.tensor(X0), torch.tensor(indices), w, 9, solver
    )
    np.testing.assert_allclose(data["samples"], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_the_manifest_guidance_scale_is_the_default_and_labels_default_to_null(
    client: TestClient, models_dir: Path
) -> None:
    data = client.post("/sample", json={"model": "cls", "x0": X0, "num_steps": 5}).json()
    assert (data["guidance_scale"], data["labels"], data["nfe"]) == (2.0, [NULL] * 4, 10)
    # With c = null both evaluations agree: guidance leaves v(t, x, null) itself.
    expected = guided_reference(
        module_of(models_dir, "cls"), torch.tensor(X0), torch.full((4,), NULL), 1.0, 5, "euler"
    )
    np.testing.assert_allclose(data["samples"], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_a_vector_condition_in_x_t_c_order_with_time_shape_b(
    client: TestClient, models_dir: Path
) -> None:
    conditions = [[0.5, 1.0, -1.0], [-1.0, 0.0, 2.0], [0.0, 0.5, 0.5], [2.0, -1.0, 0.0]]
    for condition, w in [(conditions, 1.0), (conditions[0], 1.5)]:
        body = {"model": "vec", "x0": X0, "num_steps": 6, "condition": condition}
        data = client.post("/sample", json={**body, "guidance_scale": w}).json()
        assert data["condition"] == condition
        rows = torch.tensor(condition if isinstance(condition[0], list) else [condition] * 4)
        x = torch.tensor(X0)
        module = module_of(models_dir, "vec")
        for k in range(6):
            t = torch.full((4,), k / 6)
            conditional = module(x, t, rows)
            unconditional = module(x, t, torch.zeros_like(rows))
            x = x + (unconditional + w * (conditional - unconditional)) / 6
        np.testing.assert_allclose(data["samples"], x.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_encode_and_log_prob_of_a_guided_linear_field_match_closed_forms(
    client: TestClient,
) -> None:
    # Class 1 at w = 2: v_w = v_null + 2 (v_1 - v_null) has x-coefficient 0.1 + 2 (-0.25 - 0.1)
    # = -0.6 per coordinate, so div v_w = -1.2 everywhere and its integral over [0, 1] is -1.2.
    body = {"model": "cls", "x": X0, "labels": 1, "guidance_scale": 2.0, "num_steps": 50}
    answer = client.post("/log_prob", json=body).json()
    np.testing.assert_allclose(answer["divergence_integral"], [-1.2] * 4, rtol=1e-5)
    log_p0 = -0.5 * (np.asarray(answer["latents"]) ** 2).sum(axis=1) - np.log(2 * np.pi)
    np.testing.assert_allclose(answer["log_p0"], log_p0, rtol=1e-5)
    np.testing.assert_allclose(answer["log_prob"], log_p0 + 1.2, rtol=1e-5)
    latents = client.post("/encode", json=body).json()["latents"]
    np.testing.assert_allclose(latents, answer["latents"], rtol=1e-6)


def test_mixed_labels_and_scales_share_passes_and_equal_their_solo_answers(
    models_dir: Path,
) -> None:
    requests = []
    for i in range(32):
        body = {
            "model": "cls",
            "num_samples": 3 + i % 5,
            "num_steps": 6 + i % 4,
            "seed": 500 + i,
            "solver": ("euler", "heun", "rk4")[i % 3],
            "guidance_scale": (1.0, 2.0, 0.5, 4.0)[i % 4],
        }
        body["labels"] = [j % 3 for j in range(body["num_samples"])] if i % 2 else CLASSES[i % 3]
        requests.append(("/trajectory", {**body, "stride": 2}) if i % 5 == 0 else ("/sample", body))

    async def run() -> tuple[list, list, object]:
        app = create_app(Settings(models_dir=models_dir, device="cpu"))
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://flow.test") as http,
        ):
            deadline = time.monotonic() + 60
            while (await http.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "app not ready"
                await asyncio.sleep(0.02)
            together = await asyncio.gather(*(http.post(p, json=b) for p, b in requests))
            alone = [await http.post(p, json=b) for p, b in requests]
            return together, alone, app.state.registry.served["cls"].engine.stats

    together, alone, stats = asyncio.run(run())
    for (path, _), a, b in zip(requests, together, alone, strict=True):
        assert a.status_code == b.status_code == 200, a.text
        key = "trajectory" if path == "/trajectory" else "samples"
        np.testing.assert_allclose(a.json()[key], b.json()[key], rtol=1e-5, atol=1e-5)
        assert a.json()["labels"] == b.json()["labels"]
    assert stats.max_jobs_in_pass > 8  # guided and unguided rows of many requests, one pass


def test_a_packaged_image_model_is_served_in_its_shape(
    client: TestClient, models_dir: Path
) -> None:
    manifest = client.get("/models/img").json()
    assert (manifest["shape"], manifest["inputs"], manifest["time_shape"]) == (
        [3, 4, 5],
        ["x", "t"],
        [-1],
    )
    x0 = np.random.default_rng(0).normal(size=(4, 3, 4, 5)).astype(np.float32)
    rates = np.array([0.5, 1.0, 1.5]).reshape(1, 3, 1, 1)
    expected = x0.astype(np.float64)
    for k in range(10):
        expected = expected + 0.1 * (-rates * expected + k / 10)
    # JSON, nested by sample shape; JSON, flat rows; .npy in and out.
    nested = client.post("/sample", json={"model": "img", "x0": x0.tolist(), "num_steps": 10})
    flat = client.post(
        "/sample", json={"model": "img", "x0": x0.reshape(4, -1).tolist(), "num_steps": 10}
    )
    buffer = io.BytesIO()
    np.save(buffer, x0)
    npy = client.post(
        "/sample",
        content=buffer.getvalue(),
        headers={
            "Content-Type": "application/x-npy",
            "Accept": "application/x-npy",
            "X-Flow-Model": "img",
            "X-Flow-Num-Steps": "10",
        },
    )
    for answer in (nested, flat):
        assert answer.status_code == 200, answer.text
        assert answer.json()["shape"] == [3, 4, 5]
        np.testing.assert_allclose(answer.json()["samples"], expected, rtol=1e-5, atol=1e-5)
    assert npy.status_code == 200, npy.text
    np.testing.assert_allclose(np.load(io.BytesIO(npy.content)), expected, rtol=1e-5, atol=1e-5)
    path = client.post(
        "/trajectory",
        json={"model": "img", "num_samples": 2, "num_steps": 4, "stride": 2, "seed": 1},
        headers={"Accept": "application/x-npy"},
    )
    assert np.load(io.BytesIO(path.content)).shape == (3, 2, 3, 4, 5)


def test_png_grids_for_image_models_and_406_for_others(client: TestClient) -> None:
    from PIL import Image

    answer = client.post(
        "/sample",
        json={"model": "img", "num_samples": 6, "seed": 3},
        headers={"Accept": "image/png"},
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["x-flow-seed"] == "3"
    picture = Image.open(io.BytesIO(answer.content))
    # 6 tiles in 3 columns x 2 rows of 4 x 5 images upscaled 13 times (to >= 64 pixels a
    # side), with 2-pixel gaps
    assert picture.size == (3 * (5 * 13 + 2) + 2, 2 * (4 * 13 + 2) + 2)
    colours = np.asarray(picture.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(colours, axis=0)) > 10  # samples, not a blank canvas
    refused = client.post(
        "/sample", json={"model": "cls", "num_samples": 2}, headers={"Accept": "image/png"}
    )
    assert refused.status_code == 406
    assert refused.json()["detail"].startswith("accept: image/png is offered by POST /sample")


ERRORS = [
    ({"model": "cls", "labels": 3}, "labels: class 3 is out of range; model cls has 3 classes"),
    ({"model": "cls", "labels": "zz"}, "labels: unknown class 'zz'; model cls has a, b, c"),
    ({"model": "cls", "labels": [0, 1]}, "labels: 2 labels for 4 rows; give one label for"),
    ({"model": "cls", "labels": [0, 1, 9, 2]}, "labels[2]: class 9 is out of range"),
    ({"model": "cls", "labels": -1}, "labels: a class index is >= 0, got -1"),
    ({"model": "cls", "labels": 1.5}, "labels: expected a class index or a class name, got 1.5"),
    ({"model": "cls", "labels": True}, "labels: expected a class index or a class name, got True"),
    ({"model": "cls", "labels": []}, "labels: must hold at least one label"),
    ({"model": "cls", "condition": [1.0]}, "condition: model cls takes class labels (labels)"),
    ({"model": "tiny", "labels": 0}, "labels: model tiny is unconditional; it takes no labels"),
    ({"model": "tiny", "condition": [1.0]}, "condition: model tiny is unconditional"),
    ({"model": "tiny", "guidance_scale": 2.0}, "guidance_scale: model tiny is unconditional"),
    ({"model": "cls-nonull"}, "labels: model cls-nonull needs labels"),
    (
        {"model": "cls-nonull", "labels": 0, "guidance_scale": 2.0},
        "guidance_scale: model cls-nonull has no null condition, so only 1 applies, got 2",
    ),
    ({"model": "cls", "guidance_scale": -1.0}, "guidance_scale: Input should be greater than"),
    ({"model": "vec", "labels": 1}, "labels: model vec takes a vector condition (condition)"),
    ({"model": "vec", "condition": [1.0, 2.0]}, "condition: a vector of width 2; model vec"),
    ({"model": "vec", "condition": [[1.0, 2.0, 3.0]]}, "condition: 1 vectors for 4 rows"),
    ({"model": "vec", "condition": [1.0, 2.0, 1e9]}, "condition: values must lie within"),
    ({"model": "vec", "condition": [[1.0, 2.0, 3.0]] * 3 + [[1.0]]}, "condition: rows must all"),
    ({"model": "vec", "condition": "x"}, "condition: expected a vector (a list of numbers)"),
    ({"model": "cls", "labels": 0, "condition": [1.0]}, "labels: give labels (class models) or"),
]


@pytest.mark.parametrize(("fields", "detail"), ERRORS)
@pytest.mark.parametrize("path", ["/sample", "/encode", "/log_prob"])
def test_each_conditioning_error_is_a_422_naming_the_field(
    client: TestClient, path: str, fields: dict, detail: str
) -> None:
    points = {"x0": X0} if path == "/sample" else {"x": X0}
    answer = client.post(path, json={**points, **fields})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith(detail)


def test_nan_in_a_condition_is_refused_before_any_work(client: TestClient) -> None:
    answer = client.post(
        "/sample",
        content=b'{"model": "vec", "num_samples": 2, "condition": [1.0, NaN, 0.0]}',
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 422
    assert answer.json()["detail"] == "condition[1]: Input should be a finite number"


NPY_ERRORS = [
    (b"not an npy file", {}, "x0: the body is not a .npy file"),
    (np.full((2, 2), np.nan, np.float32), {}, "x0[0]: contains NaN or infinity"),
    (np.array(["a", "b"]), {}, "x0: the .npy array must hold numbers"),
    (np.zeros(3, np.float32), {}, "x0: the .npy array must have shape (n, dim) or (n, *shape)"),
    (np.zeros((2, 2), np.float32), {"X-Flow-Colour": "red"}, "colour: Extra inputs are not"),
    (np.zeros((2, 3), np.float32), {}, "x0: points have 3 coordinates; model tiny has dim 2"),
]


@pytest.mark.parametrize(("array", "headers", "detail"), NPY_ERRORS)
def test_npy_bodies_are_checked(client: TestClient, array, headers: dict, detail: str) -> None:
    if isinstance(array, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, array)
        content = buffer.getvalue()
    else:
        content = array
    answer = client.post(
        "/sample",
        content=content,
        headers={"Content-Type": "application/x-npy", "X-Flow-Model": "tiny", **headers},
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith(detail)


def test_labelled_npy_answers_carry_the_label_and_scale_as_headers(client: TestClient) -> None:
    answer = client.post(
        "/sample",
        json={"model": "cls", "num_samples": 5, "labels": "b", "seed": 2},
        headers={"Accept": "application/x-npy"},
    )
    assert answer.headers["x-flow-labels"] == "1"
    assert answer.headers["x-flow-guidance-scale"] == "2.0"
    assert answer.headers["x-flow-nfe"] == "200"
    mixed = client.post(
        "/sample",
        json={"model": "cls", "num_samples": 2, "labels": [0, 1]},
        headers={"Accept": "application/x-npy"},
    )
    assert "x-flow-labels" not in mixed.headers  # one per row: the caller sent them


def test_the_conditional_openapi_examples_are_answered(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    tried = 0
    for path in ("/sample", "/trajectory", "/encode", "/log_prob", "/velocity"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        ref = content["application/json"]["schema"]["$ref"]
        assert "application/x-npy" in content
        for example in schemas[ref.rsplit("/", 1)[1]]["examples"]:
            if example["model"] != "digits":
                continue
            response = client.post(path, json={**example, "model": "ten-digits"})
            assert response.status_code == 200, (path, response.text)
            tried += 1
    assert tried == 5


@pytest.mark.parametrize("w", [1.0, 2.0, 0.0])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_velocity_is_the_guided_field_of_the_file(
    client: TestClient, models_dir: Path, w: float, t: float
) -> None:
    labels = [0, 1, 2, 1]
    body = {"model": "cls", "t": t, "x": X0, "labels": labels, "guidance_scale": w}
    answer = client.post("/velocity", json=body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert (data["t"], data["nfe"], data["labels"], data["guidance_scale"]) == (
        t,
        1 if w == 1 else 2,
        labels,
        w,
    )
    module = module_of(models_dir, "cls")
    x, column = torch.tensor(X0), torch.full((4, 1), t)
    with torch.no_grad():
        conditional = module(column, x, torch.tensor(labels))
        unconditional = module(column, x, torch.full((4,), NULL))
    expected = unconditional + w * (conditional - unconditional)
    np.testing.assert_allclose(data["velocity"], expected.numpy(), rtol=1e-6, atol=1e-6)


def test_velocity_of_an_unconditional_and_of_an_image_model(
    client: TestClient, models_dir: Path
) -> None:
    # Large coordinates with a small field: the answer is v itself, not (x + v) - x.
    x = [[1000.0, -2000.0], [1e-3, 3.0]]
    tiny = client.post("/velocity", json={"model": "tiny", "t": 0.5, "x": x}).json()
    np.testing.assert_allclose(tiny["velocity"], 0.5 * np.array(x), rtol=1e-7)
    assert (tiny["nfe"], tiny["num_samples"], tiny["dim"]) == (1, 2, 2)
    x0 = np.random.default_rng(3).normal(size=(2, 3, 4, 5)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, x0)
    npy = client.post(
        "/velocity",
        content=buffer.getvalue(),
        headers={
            "Content-Type": "application/x-npy",
            "Accept": "application/x-npy",
            "X-Flow-Model": "img",
            "X-Flow-T": "0.25",
        },
    )
    assert npy.status_code == 200, npy.text
    assert (npy.headers["x-flow-t"], npy.headers["x-flow-nfe"]) == ("0.25", "1")
    expected = -x0 * np.array([0.5, 1.0, 1.5]).reshape(1, 3, 1, 1) + 0.25
    np.testing.assert_allclose(np.load(io.BytesIO(npy.content)), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"t": 1.5, "x": [[0.0, 0.0]]}, "t: Input should be less than or equal to 1"),
        ({"x": [[0.0, 0.0]]}, "t: Field required"),
        ({"t": 0.5, "x": [[0.0, 0.0, 0.0]]}, "x: points have 3 coordinates; model tiny has dim 2"),
        ({"t": 0.5, "x": []}, "x: "),
    ],
)
def test_velocity_errors_are_422s_naming_the_field(client: TestClient, body: dict, detail: str):
    answer = client.post("/velocity", json={"model": "tiny", **body})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith(detail), answer.json()["detail"]
