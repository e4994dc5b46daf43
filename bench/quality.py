"""Re-score a trained artifact on more draws than the manifest's self-score, so the W2/floor
figures have a usable error bar. `python -m bench.quality models/four-gaussians [--draws 20]`.

At 2,000 points per draw, W2 is dominated by how many points land in each mode, so one set of
5 draws moves by about +-0.15; this averages `--draws` draws for each of several seeds and prints
the mean and spread of W2/floor per Euler step count.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from training.config import parse_config
from training.metrics import STEP_COUNTS, score


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--draws", type=int, default=20, help="draws of 2,000 points per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 202, 303])
    args = parser.parse_args(argv)
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    config = parse_config(manifest["config"])
    field = torch.jit.load(str(args.model_dir / "model.pt")).eval()
    ratios: dict[int, list[float]] = {k: [] for k in STEP_COUNTS}
    shares: list[list[float]] = []
    for seed in args.seeds:
        quality = score(
            field,
            config.source,
            config.target,
            torch.Generator().manual_seed(seed),
            num_samples=2000 * args.draws,
        )
        for k in STEP_COUNTS:
            ratios[k].append(quality["by_steps"][str(k)]["w2_ratio"])
        shares.append([mode["share"] for mode in quality.get("modes", [])])
    print(f"{args.model_dir.name}: W2/floor over {args.draws} draws x {len(args.seeds)} seeds")
    for k in STEP_COUNTS:
        values = ratios[k]
        print(
            f"  {k:>3} Euler steps: {statistics.mean(values):.3f}  (seeds: "
            + ", ".join(f"{v:.3f}" for v in values)
            + ")"
        )
    if shares and shares[0]:
        low = min(min(s) for s in shares)
        high = max(max(s) for s in shares)
        print(f"  mode shares at {STEP_COUNTS[-1]} steps within [{low:.4f}, {high:.4f}]")


if __name__ == "__main__":
    main()
