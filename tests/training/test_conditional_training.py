"""Class-conditional training: labelled targets, label dropout, the labelled self-score, and an
artifact the service serves with guidance."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.field import VelocityField
from service.loader import load_model
from training.config import parse_config
from training.datasets import LabelledTarget, load_labelled_file
from training.metrics import frechet_distance, nearest_distance
from training.network import ConditionalMLP
from training.train import run, signature_of, train

DIGITS = {
    "source": {"std": 1.0},
    "target": {"dataset": "digits"},
    "condition": {"kind": "class", "p_uncond": 0.2},
    "guidance_scale": 1.5,
    "model": {"hidden": 32, "layers": 2, "activation": "silu", "embedding": 8, "frequencies": 4},
    "train": {"batch_size": 64, "steps": 30, "lr": 0.003, "seed": 0},
}


@pytest.fixture
def digits() -> dict:
    return copy.deepcopy(DIGITS)


def test_the_digits_target_is_labelled_images_in_minus_one_to_one(digits: dict) -> None:
    config = parse_config(digits)
    target = config.target
    assert isinstance(target, LabelledTarget)
    assert (target.shape, target.classes, target.dim) == ((1, 8, 8), tuple("0123456789"), 64)
    assert (len(target.train_x), len(target.held_x)) == (1438, 359)
    both = torch.cat([target.train_x, target.held_x])
    assert (float(both.min()), float(both.max())) == (-1.0, 1.0)
    assert config.source.dim == 64
    torch.testing.assert_close(config.source.covs[0], torch.eye(64, dtype=torch.float64))
    # The split does not depend on the training seed: scores of runs compare.
    again = parse_config({**digits, "train": {**digits["train"], "seed": 5}}).target
    assert torch.equal(again.held_y, target.held_y)


def test_a_short_run_exports_a_model_the_service_serves_with_guidance(
    digits: dict, tmp_path: Path
) -> None:
    config = parse_config(digits)
    out = tmp_path / "tiny-digits"
    manifest = run(config, out, progress=False, score_draws=1, score_steps=4)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["shape"] == [1, 8, 8] and on_disk["inputs"] == ["t", "x", "c"]
    assert on_disk["condition"] == {"kind": "class", "classes": list("0123456789"), "null": 10}
    assert (on_disk["guidance_scale"], on_disk["data_range"]) == (1.5, [-1.0, 1.0])
    quality = on_disk["quality"]
    assert set(quality["by_guidance"]) == {"1", "1.5", "2", "3"}
    row = quality["by_guidance"]["1.5"]
    assert set(row["per_class_accuracy"]) == set("0123456789")
    assert 0 <= row["accuracy"] <= 1 and row["fd_ratio"] > 0 and row["nn_ratio"] > 0
    assert quality["num_samples"] == 1438 and quality["draws"] == 1

    served = load_model(out, torch.device("cpu"), rewrites=())
    eager = train(config, progress=False).network
    t, x = torch.rand(20, 1), torch.randn(20, 64)
    labels = torch.arange(20).remainder(11).to(torch.float32).unsqueeze(1)
    w = torch.full((20, 1), 2.0)
    expected = VelocityField(signature_of(config), eager)
    with torch.no_grad():
        torch.testing.assert_close(served.field(t, x, labels, w), expected(t, x, labels, w))


def test_label_dropout_trains_the_null_class(digits: dict, monkeypatch) -> None:
    seen: list[torch.Tensor] = []
    forward = ConditionalMLP.forward

    def recording(self, t, x, c):
        seen.append(c.clone())
        return forward(self, t, x, c)

    monkeypatch.setattr(ConditionalMLP, "forward", recording)
    digits["train"]["steps"] = 20
    train(parse_config(digits), progress=False)
    labels = torch.cat(seen)
    share = float((labels == 10).float().mean())
    assert 0.15 < share < 0.25  # p_uncond 0.2 of 20 x 64 labels
    assert set(labels.tolist()) == set(range(11))


CONFIG_ERRORS = [
    (
        lambda c: c.pop("condition"),
        'condition: a labelled target trains a class-conditional model; add "condition"',
    ),
    (
        lambda c: c.update(
            target={"means": [[0.0] * 64], "covs": [np.eye(64).tolist()], "weights": [1]}
        ),
        "condition: needs a labelled target",
    ),
    (lambda c: c["condition"].update(kind="vector"), "condition.kind: expected one of class"),
    (lambda c: c["condition"].update(p_uncond=0.95), "condition.p_uncond: must be in [0.0, 0.9]"),
    (
        lambda c: c["condition"].update(p_uncond=0.0),
        "guidance_scale: needs a condition trained with p_uncond > 0",
    ),
    (lambda c: c["train"].update(coupling="ot"), "train.coupling: ot re-pairs points without"),
    (lambda c: c.update(source={"std": 0}), "source.std: must be in (0.0, inf]"),
    (lambda c: c["target"].update(holdout=1.0), "target.holdout: must be in (0.0, 0.9]"),
    (lambda c: c["model"].update(embedding=0), "model.embedding: must be at least 1"),
]


@pytest.mark.parametrize(("change", "message"), CONFIG_ERRORS)
def test_conditional_config_errors_name_the_field(digits: dict, change, message: str) -> None:
    change(digits)
    with pytest.raises(ValueError) as info:
        parse_config(digits)
    assert str(info.value).startswith(message)


def test_a_labelled_npz_file(tmp_path: Path, digits: dict) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2, 3)).astype(np.float32)
    y = np.arange(40) % 3
    np.savez(tmp_path / "data.npz", x=x, y=y, classes=np.array(["cat", "dog", "owl"]))
    digits["target"] = {"file": "data.npz", "holdout": 0.25}
    config = parse_config(digits, base_dir=tmp_path)
    assert (config.target.shape, config.target.classes) == ((2, 3), ("cat", "dog", "owl"))
    assert (len(config.target.train_x), len(config.target.held_x)) == (30, 10)
    assert config.dim == 6 and signature_of(config).shape == (2, 3)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 2))}, "missing array(s) y"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3, int)}, "y must be 4 integer labels"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, -1, 0])}, "y holds a negative label"),
        ({"x": np.full((4, 2), np.nan), "y": np.zeros(4, int)}, "x contains NaN or infinity"),
        (
            {"x": np.zeros((4, 2)), "y": np.array([0, 1, 2, 0]), "classes": np.array(["a"])},
            "classes must name every label 0 .. 2",
        ),
    ],
)
def test_bad_npz_files_are_named(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError) as info:
        load_labelled_file(tmp_path / "bad.npz", "bad.npz")
    assert str(info.value) == f"target.file: {tmp_path / 'bad.npz'}: {message}"


def test_frechet_distance_of_gaussians_against_the_closed_form() -> None:
    # N(0, I) against N(mu, 4 I) in d dimensions: |mu|^2 + tr(I + 4 I - 2 (4 I)^(1/2)) = |mu|^2 + d.
    rng = np.random.default_rng(0)
    d, n = 5, 400_000
    mu = np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    a = rng.normal(size=(n, d))
    b = mu + 2 * rng.normal(size=(n, d))
    assert frechet_distance(a, b) == pytest.approx(float(mu @ mu) + d, rel=0.01)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # a pixel that never changes (a singular covariance) does not break it
    still = np.column_stack([a[:1000], np.zeros(1000)])
    assert np.isfinite(frechet_distance(still, still + 0.1))


def test_nearest_distance() -> None:
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    reference = torch.tensor([[0.0, 1.0], [3.0, 0.0], [10.0, 10.0]])
    torch.testing.assert_close(
        nearest_distance(points, reference), torch.tensor([1.0, 4.0], dtype=torch.float64)
    )


def test_the_run_prints_its_scoring_stages(digits: dict, tmp_path: Path, capsys) -> None:
    run(parse_config(digits), tmp_path / "m", progress=False, score_draws=1, score_steps=2)
    out = capsys.readouterr().out
    assert "scoring: fitting the classifier on the training split" in out
    assert "scoring: 1 draws of 1438 samples at guidance 1.5" in out
    assert "guidance 1.5: accuracy " in out
