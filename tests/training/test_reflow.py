"""Reflow and distillation: pairs from the teacher's own solver, the teacher's checks, a trained
student, and the off-mode metric that judges few-step samples."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from scipy import stats

from service.app import create_app
from service.mixture import GaussianMixture
from service.settings import Settings
from training.config import parse_config
from training.metrics import OFF_MODE_QUANTILE, off_mode_share
from training.reflow import distillation_loss, load_teacher, teacher_pairs
from training.train import train

PAIR_STEPS = 8


def reflow_raw(raw: dict, teacher: Path, **teacher_settings) -> dict:
    """`raw` (a four-gaussians config) made a reflow config with `teacher`."""
    raw = json.loads(json.dumps(raw))
    raw["train"].update({"coupling": "reflow", "steps": 100})
    raw["teacher"] = {"path": str(teacher), **teacher_settings}
    return raw


def test_pairs_are_the_teachers_euler_solution_as_the_service_computes_it(
    raw_config, teacher_dir
) -> None:
    raw = reflow_raw(raw_config, teacher_dir, solver="euler", steps=PAIR_STEPS, pairs=300)
    config = parse_config(raw)
    x0, x1 = teacher_pairs(load_teacher(config), config, torch.Generator().manual_seed(0))
    assert x0.shape == x1.shape == (300, 2)
    settings = Settings(models_dir=teacher_dir.parent, device="cpu", graph_rewrites=[])
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        answer = client.post(
            "/sample",
            json={
                "model": "teacher",
                "x0": x0.tolist(),
                "num_steps": PAIR_STEPS,
                "solver": "euler",
            },
        )
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(x1.numpy(), np.asarray(answer.json()["samples"]), atol=1e-5)
    # And the pairs really moved: the teacher's map is not the identity.
    assert (x1 - x0).norm(dim=1).mean() > 2.0


def test_relative_teacher_paths_are_read_from_the_configs_folder(raw_config, teacher_dir) -> None:
    raw = reflow_raw(raw_config, teacher_dir)
    raw["teacher"]["path"] = "teacher"
    config = parse_config(raw, base_dir=teacher_dir.parent)
    assert config.teacher.location == teacher_dir.parent / "teacher"
    assert config.to_dict()["teacher"] == {
        "path": "teacher",
        "solver": "rk4",
        "steps": 25,
        "pairs": 200_000,
        "distill": 0.0,
    }


def test_a_reflow_student_trains_from_the_pairs_and_distillation_adds_its_terms(
    raw_config, teacher_dir
) -> None:
    raw = reflow_raw(raw_config, teacher_dir, steps=4, pairs=2000)
    plain = train(parse_config(raw), progress=False)
    raw["teacher"]["distill"] = 1.0
    distilled = train(parse_config(raw), progress=False)
    assert plain.losses[-1] < plain.losses[0] and distilled.losses[-1] < distilled.losses[0]
    # The same batches, one more loss term: the distilled run's losses are larger at the start.
    assert distilled.losses[0] > plain.losses[0]


def test_the_distillation_loss_is_zero_for_a_field_whose_euler_maps_land_on_x1() -> None:
    x0 = torch.randn(50, 2)
    x1 = x0 + torch.tensor([3.0, -1.0])  # a constant shift: v = x1 - x0 is exact for 1 and 2 steps
    shift = torch.tensor([3.0, -1.0])
    assert distillation_loss(lambda t, x: shift.expand_as(x), x0, x1).item() < 1e-12
    # v = 0: both maps stay at x0 and miss by |shift|^2 = 10.
    assert distillation_loss(lambda t, x: torch.zeros_like(x), x0, x1).item() == pytest.approx(10.0)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.train", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_teacher_errors_are_one_line_and_write_nothing(raw_config, teacher_dir, tmp_path) -> None:
    tampered = tmp_path / "tampered" / "teacher"  # the folder's name is the manifest's
    tampered.mkdir(parents=True)
    (tampered / "manifest.json").write_text((teacher_dir / "manifest.json").read_text())
    (tampered / "model.pt").write_bytes((teacher_dir / "model.pt").read_bytes() + b"\0")
    missing = tmp_path / "nowhere"
    three = {"means": [[0.0] * 3], "covs": [np.eye(3).tolist()], "weights": [1.0]}
    cases = [
        (
            reflow_raw(raw_config, missing),
            f"teacher.path: {missing}: no model folder there ({missing})",
        ),
        (
            {**reflow_raw(raw_config, teacher_dir), "source": three, "target": three},
            f"teacher.path: {teacher_dir}: the teacher has dimension 2, the config 3",
        ),
        (reflow_raw(raw_config, tampered), f"teacher.path: {tampered}: refused: "),
    ]
    for number, (raw, message) in enumerate(cases):
        config = tmp_path / f"config-{number}.json"
        config.write_text(json.dumps(raw))
        out = tmp_path / "out" / "student"
        result = run_cli("--config", config, "--out", out, "--score", "none")
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"error: {message}"), result.stderr
        assert result.stderr.count("\n") == 1
        assert result.stdout == "" and not out.parent.exists()
    assert "sha256" in result.stderr  # the tampered teacher's reason


@pytest.mark.parametrize("scale", [1.0, 1.5, 0.7])
def test_the_off_mode_share_of_a_gaussian_is_its_chi2_tail(scale: float) -> None:
    """Samples of N(mu, scale^2 S) lie outside N(mu, S)'s 99% ellipse with probability
    1 - F(q / scale^2), F the chi2 cdf with dim degrees of freedom and q its 99% quantile."""
    dim, rows = 3, 200_000
    cov = torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, -0.4], [0.0, -0.4, 0.5]])
    mixture = GaussianMixture.from_spec(
        {"means": [[1.0, -2.0, 0.5]], "covs": [cov.tolist()], "weights": [1.0]}
    )
    wider = GaussianMixture.from_spec(
        {"means": [[1.0, -2.0, 0.5]], "covs": [(scale**2 * cov).tolist()], "weights": [1.0]}
    )
    share = off_mode_share(wider.sample(rows, torch.Generator().manual_seed(1)), mixture)
    expected = 1 - stats.chi2.cdf(stats.chi2.ppf(OFF_MODE_QUANTILE, dim) / scale**2, dim)
    spread = (expected * (1 - expected) / rows) ** 0.5
    assert abs(share - expected) < 4 * spread + 1e-12
