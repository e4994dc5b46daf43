"""The `flowserve` command: client sub-commands against a real server, files, plots, and one-line
errors with exit codes 2 (usage) and 1 (runtime)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO_ROOT, free_port, running_server

from service import cli
from service.client import FlowClient, ModelNotFound

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
A = 0.5
"""Slope of the `tiny` model in conftest: v(t, x) = A x."""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


# --------------------------------------------------------------------------------------------
# Usage errors: exit 2, one line, no request made


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["sample", "--bogus"], "--bogus"),
        (["sample", "--num-steps", "0"], "--num-steps"),
        (["sample", "--num-samples", "many"], "--num-samples"),
        (["sample", "--solver", "leapfrog"], "--solver"),
        (["sample", "--out", "samples.txt"], "--out"),
        (["trajectory", "--plot", "paths.jpg"], "--plot"),
        (["encode"], "--x"),
        (["encode", "--x", "missing.npy"], "missing.npy"),
        (["log-prob"], "--grid"),
        (["log-prob", "--grid", "--extent", "1", "0", "0", "1"], "--extent"),
        (["nonsense"], "nonsense"),
        ([], "COMMAND"),
    ],
)
def test_bad_command_lines_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code, _, err = run(capsys, *argv, "--url", "http://127.0.0.1:1")
    assert code == 2
    assert_one_line_error(err, needle)


def test_unreachable_server_exits_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = run(capsys, "sample", "--url", url, "--num-samples", "3")
    assert code == 1
    assert_one_line_error(err, url)


def test_the_console_entry_prints_no_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "sample", "--bogus"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--bogus")


def test_serve_passes_its_arguments_to_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("service.server")
    fake.main = lambda argv=None: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "service.server", fake)
    assert cli.main(["serve", "--models-dir", "m", "--port", "9"]) == 0
    assert seen == [["--models-dir", "m", "--port", "9"]]


def test_train_runs_the_trainer_as_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(cli.subprocess, "call", lambda argv: calls.append(argv) or 3)
    assert cli.main(["train", "--config", "c.json", "--out", "models/x"]) == 3
    assert calls == [
        [sys.executable, "-m", "training.train", "--config", "c.json", "--out", "models/x"]
    ]


def test_trajectory_csv_is_long_form(tmp_path: Path) -> None:
    states = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    cli.write_array(str(tmp_path / "t.csv"), states, np.array([0.0, 0.5, 1.0]))
    table = np.loadtxt(tmp_path / "t.csv", delimiter=",", skiprows=1)
    assert table.shape == (6, 4)
    np.testing.assert_array_equal(table[:, 0], [0, 0, 0.5, 0.5, 1, 1])
    np.testing.assert_array_equal(table[:, 1], [0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(table[:, 2:], states.reshape(6, 2))


# --------------------------------------------------------------------------------------------
# Against a real server process (conftest's `tiny` model)


@pytest.mark.e2e
def test_sample_writes_the_servers_answer(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, csv, plot = tmp_path / "x1.npy", tmp_path / "x1.csv", tmp_path / "x1.png"
    args = ["--url", server_url, "--model", "tiny", "--num-samples", "50", "--num-steps", "10"]
    code, stdout, err = run(capsys, "sample", *args, "--seed", "5", "--out", str(out))
    assert (code, err) == (0, "")
    assert "shape (50, 2)" in stdout and "seed 5" in stdout
    with FlowClient(server_url) as client:
        expected = client.sample(model="tiny", num_samples=50, num_steps=10, seed=5)
    written = np.load(out)
    assert written.dtype == np.float32
    np.testing.assert_array_equal(written, expected)

    code, _, _ = run(capsys, "sample", *args, "--seed", "5", "--out", str(csv), "--plot", str(plot))
    assert code == 0
    np.testing.assert_allclose(np.loadtxt(csv, delimiter=",", skiprows=1), expected, rtol=1e-6)
    assert plot.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.e2e
def test_sample_from_x0_file_and_trajectory_plot(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x0 = np.array([[1.0, 2.0], [-1.0, 0.5]])
    np.savetxt(tmp_path / "x0.csv", x0, delimiter=",", header="a,b", comments="")
    common = ["--url", server_url, "--model", "tiny", "--num-steps", "4"]
    code, _, err = run(
        capsys,
        "sample",
        *common,
        "--x0",
        str(tmp_path / "x0.csv"),
        "--out",
        str(tmp_path / "s.npy"),
    )
    assert (code, err) == (0, "")
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), x0 * (1 + A / 4) ** 4, rtol=1e-5)

    path, plot = tmp_path / "path.npy", tmp_path / "path.png"
    code, stdout, err = run(
        capsys, "trajectory", *common, "--num-samples", "30", "--stride", "3", "--seed", "1",
        "--out", str(path), "--plot", str(plot),
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert np.load(path).shape == (3, 30, 2)  # k = 0, 3, 4
    assert "3 times" in stdout
    assert plot.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.e2e
def test_server_errors_exit_1_with_the_detail(
    server_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys, "sample", "--url", server_url, "--model", "no-such-model", "--num-samples", "2"
    )
    assert code == 1
    assert_one_line_error(err, "404", "no-such-model")


@pytest.mark.e2e
def test_encode_and_log_prob_grid(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.array([[1.0, -2.0], [0.5, 0.0]], dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    with FlowClient(server_url) as client:
        try:
            client.encode(model="tiny", x=x, num_steps=2)
        except ModelNotFound as exc:
            pytest.skip(f"the server has no /encode yet: {exc}")
    common = ["--url", server_url, "--model", "tiny", "--num-steps", "20"]
    z, zplot = tmp_path / "z.npy", tmp_path / "z.png"
    code, _, err = run(
        capsys, "encode", *common, "--x", str(tmp_path / "x.npy"), "--out", str(z),
        "--plot", str(zplot),
    )  # fmt: skip
    assert (code, err) == (0, "")
    np.testing.assert_allclose(np.load(z), x * (1 - A / 20) ** 20, rtol=1e-5)
    assert zplot.read_bytes().startswith(PNG_MAGIC)

    heat, grid = tmp_path / "density.png", tmp_path / "density.npy"
    code, stdout, err = run(
        capsys, "log-prob", "--grid", *common, "--resolution", "40", "--batch-rows", "500",
        "--samples", str(tmp_path / "x.npy"), "--plot", str(heat), "--out", str(grid),
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert heat.read_bytes().startswith(PNG_MAGIC)
    assert np.load(grid).shape == (40, 40)
    # The model's density is a Gaussian (latents scale by c = (1 - A/K)^K, minus 2A from the
    # divergence): its mass is e^(-2A) / c^2, about 1.013 at K = 20, nearly all inside [-8, 8]^2.
    mass = float(stdout.split("integrated mass")[1].split()[0])
    assert mass == pytest.approx(np.exp(-2 * A) / (1 - A / 20) ** 40, abs=0.01)


@pytest.mark.e2e
def test_flowserve_serve_starts_a_ready_server(tiny_models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    command = [
        sys.executable, "-m", "service.cli", "serve",
        "--models-dir", str(tiny_models_dir), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    with (
        running_server(command, port, log, env={"FLOW_DEVICE": "cpu"}) as url,
        FlowClient(url) as c,
    ):
        assert c.ready()
        assert c.sample(num_samples=3, num_steps=2, seed=0).shape == (3, 2)


def test_log_prob_grid_halves_batches_on_413(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mock server with a 100-row limit and the density of N(0, I_2): the grid is fetched in
    batches it accepts, and the midpoint rule over [-8, 8]^2 integrates it to 1."""
    sizes: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        x = np.asarray(json.loads(request.content)["x"])
        sizes.append(len(x))
        if len(x) > 100:
            return httpx.Response(413, json={"detail": "rows x steps over 100"})
        log_prob = -0.5 * (x**2).sum(axis=1) - np.log(2 * np.pi)
        return httpx.Response(200, json={"log_prob": log_prob.tolist(), "latents": x.tolist()})

    def mock_client(url: str, **options: object) -> FlowClient:
        return FlowClient(url, transport=httpx.MockTransport(handler))

    monkeypatch.setattr(cli, "FlowClient", mock_client)
    heat = tmp_path / "grid.png"
    code, stdout, err = run(
        capsys, "log-prob", "--grid", "--resolution", "30", "--batch-rows", "400",
        "--plot", str(heat),
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert sizes[:3] == [400, 200, 100] and set(sizes[3:]) <= {100}
    assert sum(sizes[2:]) == 900
    mass = float(stdout.split("integrated mass")[1].split()[0])
    assert mass == pytest.approx(1.0, abs=1e-3)
    assert heat.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.e2e
def test_every_command_names_the_model_that_answered_and_the_seed(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.array([[1.0, -2.0], [0.5, 0.0]], dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    url = ["--url", server_url]  # no --model: the server's default answers, and is named
    code, stdout, _ = run(capsys, "sample", *url, "--num-samples", "3", "--num-steps", "2")
    assert code == 0
    assert "model tiny, seed " in stdout and "2 euler steps, nfe 2" in stdout
    assert "default model" not in stdout
    code, stdout, _ = run(capsys, "encode", *url, "--x", str(tmp_path / "x.npy"))
    assert code == 0 and "model tiny" in stdout
    # Hutchinson without --seed: one seed is drawn, sent with every batch, and printed.
    logp = tmp_path / "logp.csv"
    code, stdout, _ = run(
        capsys, "log-prob", *url, "--x", str(tmp_path / "x.npy"), "--divergence", "hutchinson",
        "--num-probes", "4", "--num-steps", "5", "--out", str(logp),
    )  # fmt: skip
    assert code == 0
    summary = [line for line in stdout.splitlines() if "hutchinson divergence" in line]
    assert len(summary) == 1 and ", seed " in summary[0] and ", 4 probes" in summary[0]
    assert logp.read_text().splitlines()[0] == "log_prob"
    seed = int(summary[0].split(", seed ")[1].split(",")[0])
    with FlowClient(server_url) as client:
        again = client.log_prob(x=x, divergence="hutchinson", num_probes=4, num_steps=5, seed=seed)[
            "log_prob"
        ]
    np.testing.assert_allclose(np.loadtxt(logp, skiprows=1), again, rtol=1e-6)


def test_a_plot_into_a_missing_folder_fails_before_any_request(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The URL goes nowhere: a request would fail differently (exit 1).
    code, _, err = run(
        capsys, "sample", "--url", "http://127.0.0.1:9", "--num-samples", "2",
        "--plot", str(tmp_path / "no" / "such" / "a.png"),
    )  # fmt: skip
    assert code == 2
    assert err == (
        f"error: --plot {tmp_path / 'no' / 'such' / 'a.png'}: folder "
        f"{tmp_path / 'no' / 'such'} does not exist\n"
    )


def test_csv_columns_and_plot_axes_do_not_say_x0(tmp_path: Path) -> None:
    cli.write_array(str(tmp_path / "p.csv"), np.zeros((2, 3), np.float32))
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == "dim0,dim1,dim2"
    cli.write_array(str(tmp_path / "t.csv"), np.zeros((2, 1, 2), np.float32), np.array([0.0, 1.0]))
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "time,sample,dim0,dim1"
    assert cli.AXES == ("dim 0", "dim 1")
