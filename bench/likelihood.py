"""Full-size likelihood figures of a served model against its target mixture.

    .venv/bin/python bench/likelihood.py                       # the bundled four-gaussians
    .venv/bin/python bench/likelihood.py --url http://127.0.0.1:8000 --grid 100

Measures, at --num-steps steps (default 100 Euler steps, the targets; --solver changes the
KL and mass figures' solver):
- KL(target || model): the mean over fresh target samples of log p_target - log p_model (the
  model's from /log_prob); also the mean model log-density against the target's own.
- mass: the model density summed over the cell centres of a grid on the box (midpoint rule).
- round trip: mean distance between start points and /encode of their /sample, euler and rk4.
- Hutchinson (64 probes) against exact: z = (hutchinson - exact) / reported standard error.

Without --url it starts `python -m service` on --models-dir and stops it at the end. The target
is the `target` mixture of a training config (default training/configs/four-gaussians.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.client import FlowClient  # noqa: E402


class Mixture:
    """sum_k w_k N(mean_k, cov_k), evaluated with numpy only."""

    def __init__(self, spec: dict) -> None:
        self.means = np.asarray(spec["means"], dtype=np.float64)
        self.covs = np.asarray(spec["covs"], dtype=np.float64)
        weights = np.asarray(spec["weights"], dtype=np.float64)
        self.weights = weights / weights.sum()

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        component = rng.choice(len(self.weights), size=n, p=self.weights)
        chol = np.linalg.cholesky(self.covs)
        noise = rng.standard_normal((n, self.means.shape[1], 1))
        return self.means[component] + (chol[component] @ noise)[..., 0]

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        d = self.means.shape[1]
        terms = []
        for mean, cov, weight in zip(self.means, self.covs, self.weights, strict=True):
            diff = x - mean
            solved = np.linalg.solve(cov, diff.T).T
            _, logdet = np.linalg.slogdet(cov)
            terms.append(
                math.log(weight)
                - 0.5 * (d * math.log(2 * math.pi) + logdet + (diff * solved).sum(1))
            )
        stacked = np.stack(terms, axis=1)
        top = stacked.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(stacked - top).sum(axis=1, keepdims=True)))[:, 0]


@contextlib.contextmanager
def server(models_dir: Path) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "service",
        "--models-dir",
        str(models_dir),
        "--port",
        str(port),
    ]
    env = {**os.environ, "FLOW_LOG_LEVEL": "warning"}
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        with FlowClient(url) as client:
            deadline = time.monotonic() + 120
            while not client.ready():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server at {url} did not become ready")
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def log_prob(client: FlowClient, x: np.ndarray, batch_rows: int, **options) -> np.ndarray:
    """/log_prob of x (n, d) in requests of batch_rows rows, within the server's work limit."""
    parts = [
        client.log_prob(x=x[start : start + batch_rows], **options)["log_prob"]
        for start in range(0, len(x), batch_rows)
    ]
    return np.concatenate(parts)


def timed(label: str, seconds: dict, started: float) -> None:
    seconds[label] = round(time.monotonic() - started, 2)


def measure(client: FlowClient, target: Mixture, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    steps, model, solver = args.num_steps, args.model, args.solver
    figures: dict = {"model": model, "num_steps": steps, "solver": solver}
    seconds: dict[str, float] = {}

    started = time.monotonic()
    x = target.sample(args.samples, rng)
    options = {"model": model, "num_steps": steps, "solver": solver, "divergence": "exact"}
    model_lp = log_prob(client, x, args.batch_rows, **options)
    target_lp = target.log_prob(x)
    gap = target_lp - model_lp
    figures["kl"] = {
        "samples": args.samples,
        "kl_target_model": float(gap.mean()),
        "kl_stderr": float(gap.std(ddof=1) / math.sqrt(len(gap))),
        "mean_model_log_prob": float(model_lp.mean()),
        "mean_target_log_prob": float(target_lp.mean()),
    }
    timed("kl", seconds, started)

    started = time.monotonic()
    xmin, xmax, ymin, ymax = args.extent
    n = args.grid
    hx, hy = (xmax - xmin) / n, (ymax - ymin) / n
    gx, gy = np.meshgrid(xmin + hx * (np.arange(n) + 0.5), ymin + hy * (np.arange(n) + 0.5))
    points = np.column_stack([gx.ravel(), gy.ravel()])
    grid_lp = log_prob(client, points, args.batch_rows, **options)
    mass = float(np.exp(grid_lp).sum() * hx * hy)
    figures["mass"] = {"grid": n, "extent": list(args.extent), "mass": mass}
    timed("mass", seconds, started)

    started = time.monotonic()
    figures["round_trip"] = {"points": args.round_trip}
    for solver in ("euler", "rk4"):
        _, path = client.trajectory(
            model=model, num_samples=args.round_trip, num_steps=steps, seed=args.seed,
            stride=steps, solver=solver,
        )  # fmt: skip
        latents = client.encode(model=model, x=path[-1], num_steps=steps, solver=solver)
        error = np.linalg.norm(latents.astype(np.float64) - path[0], axis=1)
        figures["round_trip"][solver] = {"mean": float(error.mean()), "max": float(error.max())}
    timed("round_trip", seconds, started)

    started = time.monotonic()
    x = target.sample(args.hutchinson, rng)
    exact = client.log_prob(model=model, x=x, num_steps=steps, divergence="exact")
    hutch = client.log_prob(
        model=model, x=x, num_steps=steps, divergence="hutchinson", num_probes=64, seed=args.seed
    )
    z = (hutch["divergence_integral"] - exact["divergence_integral"]) / hutch["divergence_stderr"]
    figures["hutchinson"] = {
        "points": args.hutchinson,
        "num_probes": 64,
        "mean_stderr": float(hutch["divergence_stderr"].mean()),
        "mean_abs_error": float(
            np.abs(hutch["divergence_integral"] - exact["divergence_integral"]).mean()
        ),
        "mean_z_squared": float(np.mean(z**2)),
        "within_2_stderr": float(np.mean(np.abs(z) < 2)),
        "max_abs_z": float(np.abs(z).max()),
    }
    timed("hutchinson", seconds, started)
    figures["seconds"] = seconds
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one on --models-dir)")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="four-gaussians")
    parser.add_argument(
        "--config", type=Path, default=ROOT / "training" / "configs" / "four-gaussians.json",
        help="training config whose `target` mixture the samples come from",
    )  # fmt: skip
    parser.add_argument("--num-steps", type=int, default=100)
    parser.add_argument(
        "--solver", default="euler", help="solver of the KL and mass figures (default euler)"
    )
    parser.add_argument("--samples", type=int, default=20_000, help="target samples for the KL")
    parser.add_argument("--grid", type=int, default=200, help="N for the N x N mass grid")
    parser.add_argument("--extent", type=float, nargs=4, default=(-8.0, 8.0, -8.0, 8.0))
    parser.add_argument("--round-trip", type=int, default=2000, help="points for the round trip")
    parser.add_argument("--hutchinson", type=int, default=500, help="points for Hutchinson")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-rows", type=int, default=10_000, help="rows per /log_prob request (default 10000)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    target = Mixture(json.loads(args.config.read_text())["target"])
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(server(args.models_dir))
        client = stack.enter_context(FlowClient(url, timeout=600))
        figures = measure(client, target, args)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
