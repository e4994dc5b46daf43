import json
import math
import subprocess
import sys

import pytest
import torch

from service.solvers import integrate
from training import train as train_module
from training.config import parse_config
from training.metrics import mean_w2
from training.train import lr_factor, run, sample_times, train

SCORE = {"num_samples": 400, "chunk": 200}


def test_short_run_trains_exports_and_reloads(raw_config, tmp_path):
    config = parse_config(raw_config)
    out = tmp_path / "tiny-model"
    manifest = run(config, out, progress=False, **SCORE)
    assert sorted(p.name for p in out.iterdir()) == [
        "loss.csv",
        "manifest.json",
        "model.pt",
        "report.png",
    ]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["name"] == "tiny-model" and on_disk["dim"] == 2 and on_disk["format"] == 1
    assert on_disk["config"] == config.to_dict()
    assert on_disk["source"] == config.source.to_spec()
    quality = on_disk["quality"]
    assert set(quality["by_steps"]) == {"1", "2", "4", "8", "16", "100"}
    assert quality["w2"] == quality["by_steps"]["100"]["w2"]
    assert len(quality["modes"]) == 4 and math.isfinite(quality["npe"])

    losses = (out / "loss.csv").read_text().splitlines()
    assert losses[0] == "step,loss" and len(losses) == 201

    # The reloaded TorchScript module is the trained network.
    loaded = torch.jit.load(str(out / "model.pt"))
    eager = train(config, progress=False).network
    t, x = torch.rand(64, 1), 4 * torch.randn(64, 2)
    torch.testing.assert_close(loaded(t, x), eager(t, x), rtol=0, atol=0)


def test_same_config_and_seed_give_the_same_loss_history(raw_config):
    raw_config["train"].update(steps=50, ema=0.9, schedule="cosine", time_sampling="ends")
    first = train(parse_config(raw_config), progress=False).losses
    second = train(parse_config(raw_config), progress=False).losses
    assert first == second and len(first) == 50
    other = train(parse_config(raw_config, overrides={"seed": 1}), progress=False).losses
    assert other != first


def test_training_lowers_the_loss(raw_config):
    losses = train(parse_config(raw_config), progress=False).losses
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])


def test_nan_loss_stops_and_writes_nothing(raw_config, tmp_path, monkeypatch):
    config = parse_config(raw_config)
    monkeypatch.setattr(train_module, "sample_times", lambda n, s, g: torch.full((n, 1), math.nan))
    with pytest.raises(
        train_module.TrainingDiverged, match=r"^train: the loss became nan at step 1;"
    ):
        run(config, tmp_path / "m", progress=False, **SCORE)
    assert list(tmp_path.iterdir()) == []


def test_absurd_lr_diverges(raw_config):
    raw_config["train"].update(lr=1e30, steps=100)
    with pytest.raises(train_module.TrainingDiverged, match=r"lower train\.lr"):
        train(parse_config(raw_config), progress=False)


def test_interrupt_leaves_nothing(raw_config, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "score_w2", interrupted)
    code = train_module.main(
        [
            "--config",
            str(write_json(tmp_path, raw_config)),
            "--out",
            str(tmp_path / "out" / "m"),
            "--device",
            "cpu",
        ]
    )
    assert code == 130 and not (tmp_path / "out").exists()


def write_json(tmp_path, raw):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


def settings_with(raw_config, **train):
    raw_config["train"].update(train)
    return parse_config(raw_config).train


def test_lr_schedule(raw_config):
    settings = settings_with(
        raw_config, steps=100, lr=1.0, warmup=10, schedule="cosine", min_lr_ratio=0.1
    )
    assert lr_factor(0, settings) == pytest.approx(0.1)
    assert lr_factor(9, settings) == pytest.approx(1.0)
    assert lr_factor(10, settings) == pytest.approx(1.0)
    assert lr_factor(55, settings) == pytest.approx(0.55)
    assert lr_factor(100, settings) == pytest.approx(0.1)
    assert lr_factor(50, settings_with(raw_config, schedule="constant", warmup=0)) == 1.0


def test_time_sampling_weights_the_ends(raw_config):
    settings = settings_with(raw_config, time_sampling="ends", ends_weight=1.0)
    t = sample_times(100_000, settings, torch.Generator().manual_seed(0))
    assert t.shape == (100_000, 1) and float(t.min()) >= 0 and float(t.max()) <= 1
    # Arcsine law: P(t < 0.1) = (2 / pi) asin(sqrt(0.1)) ~ 0.205, against 0.1 for U[0, 1].
    assert float((t < 0.1).double().mean()) == pytest.approx(0.2048, abs=0.005)


def test_ot_coupling_improves_two_step_sampling():
    # A stretched Gaussian target: the OT field is affine and quick to learn, while the field of
    # independent pairs bends (at t = 0 it points every x0 at the target mean), so few-step
    # Euler contracts the samples.
    raw = {
        "source": {"means": [[0.0, 0.0]], "covs": [[[1.0, 0.0], [0.0, 1.0]]], "weights": [1]},
        "target": {"means": [[3.0, 0.0]], "covs": [[[4.0, 0.0], [0.0, 0.25]]], "weights": [1]},
        "model": {"hidden": 32, "layers": 2},
        "train": {
            "batch_size": 256,
            "steps": 300,
            "lr": 0.005,
            "seed": 0,
            "schedule": "cosine",
            "warmup": 0,
            "ema": 0.0,
        },
    }
    scores = {}
    for coupling in ("independent", "ot"):
        raw["train"]["coupling"] = coupling
        config = parse_config(raw)
        network = train(config, progress=False).network
        g = torch.Generator().manual_seed(5)
        x0 = config.source.sample(1000, g)
        with torch.no_grad():
            scores[coupling] = mean_w2(
                integrate(network, x0, 2), config.target.sample(1000, g), 500
            )
    assert scores["ot"] < 0.85 * scores["independent"]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "training.train", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("change", "out_name", "message"),
    [
        (
            {"target": {"means": [[0.0, 0.0]], "covs": [[[1.0, 2.0], [2.0, 1.0]]], "weights": [1]}},
            "m",
            "error: target.covs[0]: not positive definite",
        ),
        ({"model": {"layers": 2}}, "m", "error: model: missing hidden"),
        (
            {},
            "Bad_Name",
            "error: --out: artifact name 'Bad_Name' must match [a-z0-9][a-z0-9._-]{0,63} "
            "(it is the last part of DIR)",
        ),
        (
            {"target": {"file": "ragged.csv"}},
            "m",
            "error: target.file: {dir}/ragged.csv: ragged: line 2 has 1 values, expected 2",
        ),
    ],
    ids=["not-pd", "missing-field", "bad-name", "ragged-file"],
)
def test_cli_bad_input_prints_one_line_and_writes_nothing(
    raw_config, tmp_path, change, out_name, message
):
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    raw_config.update(change)
    config_path = write_json(tmp_path, raw_config)
    out = tmp_path / "artifacts" / out_name
    result = run_cli("--config", config_path, "--out", out, "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr == message.replace("{dir}", str(tmp_path)) + "\n"
    assert result.stdout == "" and not (tmp_path / "artifacts").exists()


def test_cli_usage_error_is_one_line(tmp_path):
    result = run_cli("--out", tmp_path / "m")
    assert result.returncode == 2
    assert result.stderr == "error: the following arguments are required: --config\n"


def test_a_run_that_is_not_on_a_terminal_prints_progress_and_its_scoring_stages(
    raw_config, tmp_path
):
    raw_config["train"]["steps"] = 30
    config_path = write_json(tmp_path, raw_config)
    result = run_cli(
        "--config", config_path, "--out", tmp_path / "m", "--device", "cpu", "--score", "quick"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    progress = [line for line in lines if line.startswith("training: step ")]
    assert progress, result.stdout
    assert progress[-1].startswith("training: step 30/30 (100%)  loss ")
    assert " steps/s  elapsed " in progress[-1] and progress[-1].endswith("left 0 s")
    assert "scoring: the W2 floor of the target (5 draws of 1000 points)" in lines
    assert "scoring: W2 at 1, 2, 4, 8, 16, 100 Euler steps (2000 points)" in lines
    assert lines[-1] == f"wrote {tmp_path / 'm'}"
    quality = json.loads((tmp_path / "m" / "manifest.json").read_text())["quality"]
    assert (quality["num_samples"], quality["chunk"], quality["floor_draws"]) == (2000, 1000, 5)


def test_progress_lines_come_every_few_seconds():
    from training.progress import Progress

    printed = []
    now = [0.0]

    class Out:
        def write(self, text):
            printed.append(text)

        def flush(self):
            pass

    report = Progress(100, "lines", out=Out(), every=10.0, clock=lambda: now[0])
    for step in range(1, 101):
        now[0] = step * 0.5  # two steps a second
        report.update(step, 1.0, 1e-3)
    lines = [text for text in printed if text.strip()]
    # at 10, 20, 30, 40 and 50 s, and the last step
    assert len(lines) == 5
    assert lines[0].startswith("training: step 20/100 (20%)  loss 1.0000  lr 1.00e-03  2.0 steps/s")
    assert lines[0].rstrip().endswith("elapsed 10 s  left 40 s")


def test_a_run_without_scoring_writes_a_model_with_a_null_quality(raw_config, tmp_path):
    raw_config["train"]["steps"] = 5
    result = run_cli(
        "--config", write_json(tmp_path, raw_config), "--out", tmp_path / "m", "--score", "none"
    )
    assert result.returncode == 0, result.stderr
    assert not any(line.startswith("scoring:") for line in result.stdout.splitlines())
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["quality"] is None
    assert (tmp_path / "m" / "report.png").stat().st_size > 0


def test_an_existing_model_is_replaced_only_with_force(raw_config, tmp_path):
    raw_config["train"]["steps"] = 3
    config_path = write_json(tmp_path, raw_config)
    out = tmp_path / "m"
    assert run_cli("--config", config_path, "--out", out, "--score", "none").returncode == 0
    before = (out / "manifest.json").read_text()
    again = run_cli("--config", config_path, "--out", out, "--score", "none", "--seed", "3")
    assert again.returncode == 2
    assert (
        again.stderr
        == f"error: --out: {out} already holds a model folder; pass --force to replace it\n"
    )
    assert again.stdout == ""
    assert (out / "manifest.json").read_text() == before
    forced = run_cli(
        "--config", config_path, "--out", out, "--score", "none", "--seed", "3", "--force"
    )
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "manifest.json").read_text())["config"]["train"]["seed"] == 3
