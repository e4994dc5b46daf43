"""The CUDA paths, on a machine that has a device: `pytest -m cuda` runs them; elsewhere they
skip. Answers on the GPU equal the same model's on the CPU to float32 rounding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, euler_reference, serving, write_post_model

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cuda-models")
    write_post_model(root, "post")
    return root


def test_samples_on_the_device_equal_an_euler_loop_on_the_cpu(models_dir: Path) -> None:
    x0 = np.random.default_rng(0).normal(size=(64, 2)).tolist()
    with serving(models_dir, device="cuda") as client:
        answer = client.post("/sample", json={"x0": x0, "num_steps": 20})
        assert answer.status_code == 200, answer.text
        registry = client.app.state.registry
        assert registry.device.type == "cuda"
        assert registry.served["post"].model.device.type == "cuda"
    module = torch.jit.load(str(models_dir / "post" / "model.pt"))
    expected = euler_reference(module, torch.tensor(x0, dtype=torch.float32), 20)
    np.testing.assert_allclose(answer.json()["samples"], expected.numpy(), rtol=1e-4, atol=1e-4)


def test_seeded_start_points_are_drawn_on_the_device_and_repeat(models_dir: Path) -> None:
    body = {"num_samples": 4096, "num_steps": 4, "seed": 11, "solver": "rk4"}
    with serving(models_dir, device="cuda") as client:
        first = client.post("/sample", json=body).json()["samples"]
        again = client.post("/sample", json=body).json()["samples"]
        other = client.post("/sample", json={**body, "seed": 12}).json()["samples"]
    np.testing.assert_allclose(first, again, rtol=1e-5, atol=1e-5)
    assert not np.allclose(first, other)


def test_likelihoods_on_the_device(models_dir: Path) -> None:
    x = [[0.5, -0.5], [1.0, 2.0]]
    with serving(models_dir, device="cuda") as gpu:
        on_gpu = gpu.post("/log_prob", json={"x": x, "num_steps": 20}).json()
    with serving(models_dir, device="cpu") as cpu:
        on_cpu = cpu.post("/log_prob", json={"x": x, "num_steps": 20}).json()
    np.testing.assert_allclose(on_gpu["log_prob"], on_cpu["log_prob"], rtol=1e-4, atol=1e-4)


def test_the_trainer_trains_on_the_device(tmp_path: Path) -> None:
    config = {
        "source": {"std": 1.0},
        "target": {"means": [[2.0, 2.0]], "covs": [np.eye(2).tolist()], "weights": [1.0]},
        "model": {"hidden": 16, "layers": 2},
        "train": {"batch_size": 64, "steps": 20, "lr": 0.01, "seed": 0},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "gpu-trained"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.train",
            "--config",
            str(tmp_path / "config.json"),
            "--out",
            str(out),
            "--device",
            "cuda",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    # The artifact is CPU float32, servable anywhere.
    module = torch.jit.load(str(out / "model.pt"), map_location="cpu")
    assert all(p.device.type == "cpu" for p in module.parameters())
