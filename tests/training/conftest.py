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
