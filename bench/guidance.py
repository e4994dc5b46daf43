"""The cost of classifier-free guidance per step, against the unguided pass of the same model.

    python -m bench.guidance [--model-dir models/digits] [--rows 16 256 4096] [--steps 50]

A guided row (w != 1) puts two rows through the network each stage: its conditional and its null
evaluation, in one call. This loads a class-conditional model as the service does (loader, fast
path, engine) and times, in the same process and alternating so a busy machine slows both
alike, one request of R rows and K Euler steps with w = 1 (one evaluation a step) and with
w = 2 (two). It prints milliseconds per step and the ratio guided / unguided: 2 where the
network dominates, less where the engine's fixed per-pass work does.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import torch

from service.engine import Engine, Job
from service.loader import load_model
from service.process import keep_freed_memory
from service.settings import Settings


async def one_request(engine: Engine, rows: int, steps: int, w: float, label: int) -> float:
    condition = torch.full((rows, 1), float(label))
    job = Job(
        z0=torch.randn(rows, engine.model.dim),
        solver="euler",
        num_steps=steps,
        condition=condition,
        guidance=None if w == 1 else w,
    )
    start = time.perf_counter()
    await engine.run(job)
    return time.perf_counter() - start


async def measure(engine: Engine, rows: int, steps: int, reps: int) -> tuple[float, float]:
    """Median seconds per step of an unguided and a guided request, calls alternating."""
    plain, guided = [], []
    await one_request(engine, rows, steps, 1.0, 0)  # plans for this size are built here
    await one_request(engine, rows, steps, 2.0, 0)
    for rep in range(reps):
        plain.append(await one_request(engine, rows, steps, 1.0, rep % 10))
        guided.append(await one_request(engine, rows, steps, 2.0, rep % 10))
    return statistics.median(plain) / steps, statistics.median(guided) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/digits"))
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 256, 4096])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    keep_freed_memory()  # as python -m service does
    settings = Settings(device="cpu")
    model = load_model(
        args.model_dir,
        torch.device("cpu"),
        rewrites=settings.graph_rewrites,
        fused_min_rows=settings.fused_min_rows,
        warmup_passes=settings.warmup_passes,
    )
    if model.signature.condition is None or not model.signature.condition.has_null:
        parser.error(f"{args.model_dir}: not a conditional model with a null condition")
    engine = Engine(
        model,
        max_batch_rows=settings.max_batch_rows,
        block_rows=settings.block_rows,
        max_queue_rows=settings.max_queue_rows,
        chunk_rows=settings.chunk_rows,
        single_thread_rows=settings.single_thread_rows,
    )
    engine.start()
    try:
        print(
            f"model {model.name} (dim {model.dim}, graph rewrites: "
            f"{', '.join(model.optimizations) or 'none'}); {args.steps} Euler steps, "
            f"median of {args.reps}"
        )
        print(f"{'rows':>6} {'w = 1 ms/step':>14} {'w = 2 ms/step':>14} {'guided / plain':>15}")
        for rows in args.rows:
            plain, guided = asyncio.run(measure(engine, rows, args.steps, args.reps))
            print(f"{rows:>6} {plain * 1e3:>14.3f} {guided * 1e3:>14.3f} {guided / plain:>15.2f}")
    finally:
        engine.stop(timeout=10)


if __name__ == "__main__":
    main()
