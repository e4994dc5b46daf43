"""Few-step quality of the bundled Gaussian-mixture models, measured apart from their training.

    python -m bench.fewstep [--models four-gaussians four-gaussians-ot four-gaussians-wide ...]
                            [--points 20000] [--seeds 0 1 2] [--steps 1 2 4 100]

Each model is loaded as the service loads it (its served graph) and integrated with Euler from
`--points` fresh start points per evaluation seed, at each step count. Per step count:

- off-mode share: samples outside every target component's 99% ellipse (squared Mahalanobis
  distance past the chi2 quantile); the target itself puts 1% there, and a draw of the target
  of the same size is printed beside it. This is the figure that sees mass between the modes;
- W2 / floor: exact W2 of each 2,000-point chunk against a fresh target chunk, averaged over the
  chunks, over the floor (the mean W2 between two target chunks, 20 draws);
- mode shares: the smallest and largest share of samples nearest to each mode.

Printed per seed, then as mean and standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from service.loader import load_model
from service.mixture import GaussianMixture
from service.solvers import integrate
from training.datasets import MixtureTarget
from training.metrics import chunked_w2, mode_stats, off_mode_share, w2_floor

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
MODELS = ("four-gaussians", "four-gaussians-ot", "four-gaussians-wide", "four-gaussians-fast")
CHUNK = 2000
EVAL_SEED = 7_000


def evaluate(folder: Path, points: int, seed: int, steps: list[int]) -> dict[int, dict]:
    model = load_model(folder, torch.device("cpu"))
    target = GaussianMixture.from_spec(model.manifest["config"]["target"])
    floor, _ = w2_floor(MixtureTarget(target), CHUNK)
    generator = torch.Generator().manual_seed(EVAL_SEED + seed)
    x0 = model.source.sample(points, generator)
    rows = {}
    for k in steps:
        final = integrate(model.field, x0, k, "euler")
        pieces = chunked_w2(final, target.sample(points, generator), CHUNK)
        shares = [m["share"] for m in mode_stats(final, target)]
        rows[k] = {
            "off-mode %": 100 * off_mode_share(final, target),
            "W2/floor": float(np.mean(pieces)) / floor,
            "min share": min(shares),
            "max share": max(shares),
        }
    rows[0] = {"off-mode %": 100 * off_mode_share(target.sample(points, generator), target)}
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 100])
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    for name in args.models:
        started = time.perf_counter()
        runs = [evaluate(args.models_dir / name, args.points, s, args.steps) for s in args.seeds]
        print(f"\n{name}: {args.points} points x {len(args.seeds)} seeds, mean (sd over seeds)")
        for k in args.steps:
            cells = []
            for key in runs[0][k]:
                values = [run[k][key] for run in runs]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{key} {np.mean(values):.3f} ({spread:.3f})")
            print(f"  {k:>4} steps  " + "  ".join(cells))
        target = [run[0]["off-mode %"] for run in runs]
        print(f"  target's own off-mode %: {np.mean(target):.3f}")
        print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
