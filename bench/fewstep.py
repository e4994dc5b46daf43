"""Few-step quality of the bundled Gaussian-mixture models, measured apart from their training.

    python -m bench.fewstep [--models four-gaussians four-gaussians-ot four-gaussians-wide ...]
                            [--points 40000] [--seeds 0 1 2] [--steps 1 2 4 100]
                            [--floor-draws 200]

Each model is loaded as the service loads it (its served graph) and integrated with Euler from
`--points` fresh start points per evaluation seed, at each step count. Per step count:

- off-mode share: samples outside every target component's 99% ellipse (squared Mahalanobis
  distance past the chi2 quantile); the target itself puts 1% there, and a draw of the target
  of the same size is printed beside it. This is the figure that sees mass between the modes;
- W2 / floor: exact W2 of each 2,000-point chunk against a fresh target chunk, over the floor
  (the mean W2 between two target chunks, `--floor-draws` draws). A single chunk's W2 moves by
  about 30% of the floor (how many points land in each mode), so the figure is the mean over
  every chunk of every seed, printed with its standard error, and beside it the same estimator
  run on a fresh target draw instead of a model: what a perfect sampler scores with these draws;
- mode shares: the smallest and largest share of samples nearest to each mode.

Printed per step count as the mean and standard deviation over the seeds (W2: over the chunks).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from service.loader import LoadedModel, load_model
from service.mixture import GaussianMixture
from service.solvers import integrate
from training.datasets import MixtureTarget
from training.metrics import chunked_w2, mode_stats, off_mode_share, w2_floor

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
MODELS = ("four-gaussians", "four-gaussians-ot", "four-gaussians-wide", "four-gaussians-fast")
CHUNK = 2000
EVAL_SEED = 7_000


def evaluate(
    model: LoadedModel,
    target: GaussianMixture,
    points: int,
    seed: int,
    steps: list[int],
    floor: float,
) -> dict[int, dict]:
    """Per step count (0: a target draw scored as samples): off-mode %, mode shares and the
    W2/floor of each chunk."""
    generator = torch.Generator().manual_seed(EVAL_SEED + seed)
    x0 = model.source.sample(points, generator)
    rows = {}
    for k in [*steps, 0]:
        final = integrate(model.field, x0, k, "euler") if k else target.sample(points, generator)
        pieces = chunked_w2(final, target.sample(points, generator), CHUNK)
        shares = [m["share"] for m in mode_stats(final, target)]
        rows[k] = {
            "off-mode %": 100 * off_mode_share(final, target),
            "min share": min(shares),
            "max share": max(shares),
            "w2 chunks": [piece / floor for piece in pieces],
        }
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--points", type=int, default=40_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 100])
    parser.add_argument("--floor-draws", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    for name in args.models:
        started = time.perf_counter()
        model = load_model(args.models_dir / name, torch.device("cpu"))
        target = GaussianMixture.from_spec(model.manifest["config"]["target"])
        floor, floor_sd = w2_floor(MixtureTarget(target), CHUNK, args.floor_draws)
        runs = [evaluate(model, target, args.points, s, args.steps, floor) for s in args.seeds]
        print(
            f"\n{name}: {args.points} points x {len(args.seeds)} seeds, mean (sd over seeds; "
            f"W2: over chunks, with its standard error); floor {floor:.4f} (sd {floor_sd:.4f}, "
            f"standard error {floor_sd / math.sqrt(args.floor_draws):.4f}, "
            f"{args.floor_draws} draws)"
        )
        for k in [*args.steps, 0]:
            cells = []
            for key in ("off-mode %", "min share", "max share"):
                values = [run[k][key] for run in runs]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{key} {np.mean(values):.3f} ({spread:.3f})")
            chunks = np.concatenate([run[k]["w2 chunks"] for run in runs])
            error = chunks.std(ddof=1) / math.sqrt(len(chunks))
            cells.insert(
                1, f"W2/floor {chunks.mean():.3f} (sd {chunks.std(ddof=1):.3f}, +-{error:.3f})"
            )
            label = f"{k:>4} steps" if k else "  target  "
            print(f"  {label}  " + "  ".join(cells))
        print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
