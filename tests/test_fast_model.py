"""The bundled few-step model, models/four-gaussians-fast: trained by its config from the bundled
teacher (models/four-gaussians-wide), and its 1- and 2-step samples on the modes, counted afresh
through the service."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import serving

from service.mixture import GaussianMixture
from training.config import load_config
from training.metrics import mode_stats, off_mode_share
from training.reflow import load_teacher

REPO_ROOT = Path(__file__).resolve().parents[1]
FOLDER = REPO_ROOT / "models" / "four-gaussians-fast"
CONFIG = REPO_ROOT / "training" / "configs" / "four-gaussians-fast.json"

pytestmark = pytest.mark.skipif(
    not (FOLDER / "model.pt").exists(),
    reason="models/four-gaussians-fast is not there: python -m training.train --config "
    "training/configs/four-gaussians-fast.json --out models/four-gaussians-fast",
)


def manifest() -> dict:
    return json.loads((FOLDER / "manifest.json").read_text())


def test_it_was_trained_by_the_bundled_config_from_the_bundled_teacher() -> None:
    config = load_config(CONFIG)
    assert manifest()["config"] == config.to_dict()
    assert config.teacher.location.resolve() == REPO_ROOT / "models" / "four-gaussians-wide"
    load_teacher(config)  # there, intact (sha256), of the same dimension and source


def test_one_and_two_steps_land_on_the_modes(tmp_path: Path) -> None:
    shutil.copytree(FOLDER, tmp_path / "four-gaussians-fast")
    target = GaussianMixture.from_spec(manifest()["config"]["target"])
    shares = {}
    with serving(tmp_path) as client:
        for steps in (1, 2):
            body = {"num_samples": 20_000, "num_steps": steps, "seed": 11}
            answer = client.post("/sample", json=body, headers={"Accept": "application/x-npy"})
            assert answer.status_code == 200, answer.text
            samples = torch.from_numpy(np.load(io.BytesIO(answer.content)))
            shares[steps] = [m["share"] for m in mode_stats(samples, target)]
            off = off_mode_share(samples, target)
            # The target itself puts 1.0% outside the ellipses.
            assert off <= {1: 0.03, 2: 0.02}[steps], (steps, off)
    # Each mode's share within 0.01 of its weight, at either step count.
    for steps, row in shares.items():
        assert abs(min(row) - 0.25) <= 0.01 and abs(max(row) - 0.25) <= 0.01, (steps, row)
