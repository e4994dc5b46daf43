"""The bundled class-conditional model, models/digits: its self-score, and the same figures from
a fresh scoring of samples drawn through the service."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import serving
from sklearn.linear_model import LogisticRegression

from training.config import load_config
from training.metrics import frechet_distance, nearest_distance

REPO_ROOT = Path(__file__).resolve().parents[1]
FOLDER = REPO_ROOT / "models" / "digits"
CONFIG = REPO_ROOT / "training" / "configs" / "digits.json"

pytestmark = pytest.mark.skipif(
    not (FOLDER / "model.pt").exists(),
    reason="models/digits is not there: python -m training.train --config "
    "training/configs/digits.json --out models/digits",
)


def manifest() -> dict:
    return json.loads((FOLDER / "manifest.json").read_text())


def test_it_was_trained_by_the_bundled_config() -> None:
    assert manifest()["config"] == load_config(CONFIG).to_dict()


def test_the_self_score_meets_the_bars() -> None:
    quality = manifest()["quality"]
    default = f"{manifest()['guidance_scale']:g}"
    plain, guided = quality["by_guidance"]["1"], quality["by_guidance"][default]
    assert quality["draws"] >= 3 and quality["num_samples"] == 1438
    assert plain["accuracy"] >= 0.97
    assert guided["accuracy"] >= 0.99
    assert plain["fd_ratio"] <= 2.0 and guided["fd_ratio"] <= 2.0
    # No closer to the training set than unseen digits are: not copies.
    assert plain["nn_ratio"] >= 1.0 and guided["nn_ratio"] >= 1.0


def test_a_fresh_scoring_through_the_service_agrees(tmp_path: Path) -> None:
    target = load_config(CONFIG).target
    classifier = LogisticRegression(max_iter=5000).fit(target.train_x.numpy(), target.train_y)
    floor = frechet_distance(target.train_x.numpy(), target.held_x.numpy())
    held_nearest = float(nearest_distance(target.held_x, target.train_x).mean())
    labels = target.train_y.tolist()
    shutil.copytree(FOLDER, tmp_path / "digits")
    figures = {}
    with serving(tmp_path) as client:
        for w in (1.0, manifest()["guidance_scale"]):
            body = {"num_samples": len(labels), "labels": labels, "guidance_scale": w, "seed": 11}
            answer = client.post("/sample", json=body, headers={"Accept": "application/x-npy"})
            assert answer.status_code == 200, answer.text
            samples = np.load(io.BytesIO(answer.content))
            assert samples.shape == (len(labels), 1, 8, 8)
            flat = samples.reshape(len(labels), -1)
            figures[w] = (
                float((classifier.predict(flat) == np.asarray(labels)).mean()),
                frechet_distance(flat, target.held_x.numpy()) / floor,
                float(nearest_distance(torch.from_numpy(flat), target.train_x).mean())
                / held_nearest,
            )
    (plain_accuracy, plain_fd, plain_nn), (accuracy, fd, nn) = figures.values()
    assert plain_accuracy >= 0.97 and accuracy >= 0.99
    assert plain_fd <= 2.0 and fd <= 2.0
    assert plain_nn >= 1.0 and nn >= 1.0
    quality = manifest()["quality"]["by_guidance"]
    # The service's answers score as the trainer's own sampler did, within a few of its sds.
    for w, (acc, ratio, _) in figures.items():
        key = f"{w:g}"
        assert abs(acc - quality[key]["accuracy"]) <= 0.01
        assert abs(ratio - quality[key]["fd_ratio"]) <= max(0.15, 4 * quality[key]["fd_ratio_sd"])
