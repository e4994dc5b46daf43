"""Forward passes of changing row counts, as an engine under load makes them: the fused graph
planned per power of two (as served) against one fused copy that sees every row count, and the
unfused graph. `python -m bench.row_counts [--model-dir models/four-gaussians] [--passes N]`.

An engine's pass takes the rows of the requests in flight, so its row count moves with every
request that comes or goes. A TorchScript graph fused by oneDNN is specialised to the row counts
it has run; past a dozen it runs unfused. The passes here walk the row counts a busy engine
sees as load comes up and then holds (requests of 16 rows coming and going around 1,000 rows in
flight, now and then another load), and
the three graphs run each pass in turn, so a busy machine slows them alike. Mean microseconds
per pass, and ratios to the single fused copy.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from service.loader import load_model
from service.process import keep_freed_memory


def row_counts(passes: int, seed: int = 0) -> list[int]:
    """Pass sizes: the load coming up (16-row requests arriving one by one, two passes each, up
    to 1,024 rows), then a walk in 16-row steps between 800 and 1,024 rows, with jumps."""
    rng = random.Random(seed)
    out = [rows for rows in range(16, 1025, 16) for _ in range(2)]
    rows = 1024
    while len(out) < passes:
        if rng.random() < 0.02:
            rows = rng.randrange(128, 4096, 16)
        else:
            rows = min(1024, max(800, rows + rng.choice((-16, 0, 16))))
        out.append(rows)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/four-gaussians"))
    parser.add_argument("--passes", type=int, default=3000)
    parser.add_argument("--fused-min-rows", type=int, default=128)
    args = parser.parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(1)  # as the engine runs passes of fewer than 4,096 rows
    model = load_model(args.model_dir, torch.device("cpu"), fused_min_rows=args.fused_min_rows)
    served = model.field
    if not served.planned:
        raise SystemExit(f"bench: {args.model_dir} is not served fused here: nothing to compare")
    small = {"small": served.small, "small_rows": args.fused_min_rows}
    fields = {
        "planned (served)": served,
        "one fused copy": served.with_graphs(served.graph, **small),
        "unfused": served.with_graphs(served.small),
    }
    sizes = row_counts(args.passes)
    inputs = {rows: served.example(rows, seed=3)[:2] for rows in set(sizes)}
    total = dict.fromkeys(fields, 0.0)
    with torch.no_grad():
        for rows in sizes:
            t, x = inputs[rows]
            for name, field in fields.items():
                start = time.perf_counter()
                field(t, x)
                total[name] += time.perf_counter() - start
    base = total["one fused copy"]
    print(f"{args.passes} passes, {len(set(sizes))} row counts, mean {sum(sizes) / len(sizes):.0f}")
    for name, seconds in total.items():
        print(f"{name:>17}: {1e6 * seconds / len(sizes):7.1f} us/pass  ({base / seconds:4.2f}x)")


if __name__ == "__main__":
    main()
