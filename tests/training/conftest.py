from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

FOUR_GAUSSIANS = {
    "source": {"means": [[0.0, 0.0]], "covs": [[[0.5, 0.0], [0.0, 0.5]]], "weights": [1.0]},
    "target": {
        "means": [[4.0, 4.0], [-4.0, 4.0], [-4.0, -4.0], [4.0, -4.0]],
        "covs": [[[0.5, 0.0], [0.0, 0.5]]] * 4,
        "weights": [0.25] * 4,
    },
    "model": {"hidden": 32, "layers": 2},
    "train": {"batch_size": 128, "steps": 200, "lr": 0.003, "seed": 0},
}


@pytest.fixture
def raw_config() -> dict:
    """A small, fast four-gaussians config as decoded JSON (a fresh copy per test)."""
    return copy.deepcopy(FOUR_GAUSSIANS)


@pytest.fixture
def write_config(tmp_path: Path):
    def write(raw: dict, name: str = "config.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(raw), "utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trained four-gaussians model folder (200 steps, not scored): a reflow teacher."""
    from training.config import parse_config
    from training.train import run

    out = tmp_path_factory.mktemp("teachers") / "teacher"
    run(parse_config(FOUR_GAUSSIANS), out, progress=False, score="none")
    return out
