"""Forward-pass time of a model under each graph rewrite, side by side (ratios to the graph as
loaded). `python -m bench.fastpath [--model-dir models/four-gaussians] [--threads N]`.

Each variant is timed interleaved with the others and the minimum over repetitions is kept, so
a busy machine skews every variant alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from service.fastpath import optimize
from service.field import Signature, VelocityField
from service.process import keep_freed_memory

VARIANTS = {
    "as loaded": (),
    "freeze": ("freeze",),
    "freeze+elu": ("freeze", "elu"),
    "freeze+time_fold": ("freeze", "time_fold"),
    "freeze+onednn": ("freeze", "onednn"),
    "all": ("freeze", "elu", "time_fold", "onednn"),
}


def time_forward(module, t: torch.Tensor, x: torch.Tensor) -> float:
    start = time.perf_counter()
    module(t, x)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/four-gaussians"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 256, 2048, 8192, 16384, 65536])
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as python -m service does: allocation churn would swamp the rewrites
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    dim = manifest["dim"]
    loaded = torch.jit.load(str(args.model_dir / "model.pt")).eval()
    field = VelocityField(Signature.from_manifest(manifest), loaded)
    modules = {}
    # The oneDNN fuser is switched on for the whole process by the first variant that uses it;
    # a graph's plan is built on its second call, so the unfused variants run twice before that.
    unfused = sorted(VARIANTS, key=lambda name: "onednn" in VARIANTS[name])
    for name in unfused:
        rewrites = VARIANTS[name]
        fast = optimize(field, rewrites)
        modules[name], applied = fast.module, fast.applied
        if name != "as loaded" and applied != list(rewrites):
            print(f"{name}: only {applied} applied")
        if "onednn" not in rewrites:
            with torch.no_grad():
                for _ in range(2):
                    modules[name](torch.rand(8, 1), torch.randn(8, dim))
    modules = {name: modules[name] for name in VARIANTS}
    print(f"threads {torch.get_num_threads()}; best of {args.reps}; microseconds per pass")
    print(f"{'rows':>7} " + " ".join(f"{name:>17}" for name in modules))
    for rows in args.rows:
        t = torch.rand(rows, 1)
        x = torch.randn(rows, dim)
        best = dict.fromkeys(modules, float("inf"))
        with torch.no_grad():
            for module in modules.values():
                module(t, x)
            for _ in range(args.reps):
                for name, module in modules.items():
                    best[name] = min(best[name], time_forward(module, t, x))
        base = best["as loaded"]
        cells = [f"{best[n] * 1e6:9.0f} ({base / best[n]:4.2f}x)" for n in modules]
        print(f"{rows:>7} " + " ".join(f"{c:>17}" for c in cells))


if __name__ == "__main__":
    main()
