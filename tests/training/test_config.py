import json
from pathlib import Path

import numpy as np
import pytest

from training.config import TrainConfig, load_config, parse_config
from training.datasets import DatasetTarget, MixtureTarget, PointCloudTarget

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def test_parses_the_bundled_configs():
    for name in ("four-gaussians", "four-gaussians-ot"):
        config = load_config(CONFIGS / f"{name}.json")
        assert config.dim == 2 and isinstance(config.target, MixtureTarget)
        assert (config.model.hidden, config.model.layers, config.model.activation) == (64, 3, "elu")
        assert config.source.to_spec() == {
            "means": [[0.0, 0.0]],
            "covs": [[[0.5, 0.0], [0.0, 0.5]]],
            "weights": [1.0],
        }
    assert load_config(CONFIGS / "four-gaussians-ot.json").train.coupling == "ot"


def test_defaults_and_overrides(raw_config):
    config = parse_config(raw_config, overrides={"steps": 7, "seed": None})
    # warm-up: 200 steps, or a tenth of the steps when that is less
    assert config.train == TrainConfig(batch_size=128, steps=7, lr=0.003, seed=0, warmup=0)
    assert config.model.activation == "elu"


def test_a_config_of_only_the_required_fields_gets_the_recipe_that_scores_best(raw_config):
    del raw_config["train"]
    config = parse_config(raw_config)
    assert config.train == TrainConfig(
        batch_size=1024, steps=5000, lr=0.002, seed=0, schedule="cosine", warmup=200, ema=0.999
    )


def test_flags_stand_for_the_train_keys_they_override(raw_config):
    raw_config["train"] = {"batch_size": 64}
    config = parse_config(raw_config, overrides={"steps": 3, "seed": 1})
    assert (config.train.steps, config.train.seed, config.train.batch_size) == (3, 1, 64)


def test_to_dict_round_trips(raw_config):
    raw_config["notes"] = "why"
    config = parse_config(raw_config)
    again = parse_config(json.loads(json.dumps(config.to_dict())))
    assert again.to_dict() == config.to_dict()
    assert config.to_dict()["notes"] == "why"


def test_dataset_and_file_targets(raw_config, tmp_path):
    raw_config["target"] = {"dataset": "moons", "noise": 0.2}
    config = parse_config(raw_config)
    assert isinstance(config.target, DatasetTarget) and config.target.noise == 0.2
    np.save(tmp_path / "points.npy", np.ones((10, 2)))
    raw_config["target"] = {"file": "points.npy"}
    config = parse_config(raw_config, base_dir=tmp_path)
    assert isinstance(config.target, PointCloudTarget) and len(config.target.points) == 10


def set_path(raw, path, value):
    *parents, last = path
    node = raw
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value


DELETE = object()
NOT_PD = [[1.0, 2.0], [2.0, 1.0]]
EYE = [[1.0, 0.0], [0.0, 1.0]]

BAD_CASES = [
    (("model",), DELETE, "config: missing model"),
    (("target",), DELETE, "config: missing target"),
    (("model", "hidden"), DELETE, "model: missing hidden"),
    (("extra",), 1, "config: unknown field(s) extra"),
    (("train", "momentum"), 0.9, "train: unknown field(s) momentum"),
    (("model", "width"), 3, "model: unknown field(s) width"),
    (("target", "means"), DELETE, "target: missing means"),
    (("target", "colour"), "red", "target: unknown field(s) colour"),
    (
        ("target", "covs"),
        [np.eye(3).tolist()] * 4,
        "target.covs: expected 4 matrices of 2 x 2, got shape (4, 3, 3)",
    ),
    (("target", "covs"), [EYE, EYE, NOT_PD, EYE], "target.covs[2]: not positive definite"),
    (
        ("target", "covs"),
        [EYE, [[1.0, 0.5], [0.0, 1.0]], EYE, EYE],
        "target.covs[1]: not symmetric",
    ),
    (("source", "covs"), [[[1.0, 0.0, 0.0]] * 3], "source.covs: expected 1 matrices of 2 x 2"),
    (
        ("target", "weights"),
        [0.5, -0.1, 0.3, 0.3],
        "target.weights: must be non-negative and not all zero",
    ),
    (("target", "weights"), [0, 0, 0, 0], "target.weights: must be non-negative and not all zero"),
    (("target", "means"), [[1.0, 2.0, 3.0]] * 4, "target.covs: expected 4 matrices of 3 x 3"),
    (("source", "means"), [[0.0, 0.0, 0.0]], "source.covs: expected 1 matrices of 3 x 3"),
    (("train", "steps"), 0, "train.steps: must be at least 1, got 0"),
    (("train", "batch_size"), 1.5, "train.batch_size: expected an integer, got 1.5"),
    (("train", "lr"), -1, "train.lr: must be in (0.0, inf], got -1"),
    (
        ("train", "coupling"),
        "sinkhorn",
        "train.coupling: expected one of independent, ot, reflow, got 'sinkhorn'",
    ),
    (("train", "ema"), 1.0, "train.ema: must be below 1"),
    (("model", "activation"), "swish", "model.activation: expected one of"),
    (("target",), {"dataset": "swirl"}, "target.dataset: expected one of moons, circles"),
    (("target",), {"dataset": "moons", "noise": -1}, "target.noise: must be in [0.0, inf], got -1"),
    (("target",), {"file": 3}, "target.file: expected a path"),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), BAD_CASES, ids=[c[2][:40] for c in BAD_CASES]
)
def test_bad_configs(raw_config, path, value, message):
    set_path(raw_config, path, value)
    with pytest.raises(ValueError) as info:
        parse_config(raw_config)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_dimension_mismatch(raw_config, tmp_path):
    raw_config["source"] = {
        "means": [[0.0, 0.0, 0.0]],
        "covs": [np.eye(3).tolist()],
        "weights": [1],
    }
    with pytest.raises(
        ValueError, match=r"^target: dimension 2 does not match the source's dimension 3$"
    ):
        parse_config(raw_config)
    np.save(tmp_path / "points.npy", np.ones((10, 2)))
    raw_config["target"] = {"file": "points.npy"}
    with pytest.raises(ValueError, match=r"^target: dimension 2 does not match"):
        parse_config(raw_config, base_dir=tmp_path)


def test_unreadable_and_invalid_config_files(tmp_path):
    with pytest.raises(
        ValueError, match=r"missing.json: cannot read \(No such file or directory\)$"
    ):
        load_config(tmp_path / "missing.json")
    path = tmp_path / "broken.json"
    path.write_text('{"source": ')
    with pytest.raises(
        ValueError, match=r"broken.json: not valid JSON \(Expecting value at line 1\)$"
    ):
        load_config(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match=r"^config: expected an object$"):
        load_config(path)
