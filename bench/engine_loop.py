"""The engine alone: what one model's engine does per second with no sockets and no HTTP, and
how much of a pass is not the network. `python -m bench.engine_loop [--model-dir DIR]
[--jobs 62] [--rows 16] [--steps 100] [--seconds 2] [--runs 3]`.

`--jobs` seeded requests of `--rows` x `--steps` (Euler) are in flight at once, each replaced by
a new one when it ends, as under case 3 of `bench.throughput` (64 connections, of which about
62 have a request in the engine at any time). The engine is driven by `Engine.turn` from this
thread, as the engine process's driver does. Each run times the served field, then the same
engine with a field that answers at once (every pass then costs only the engine's own work),
and prints requests/s, passes/s and microseconds per pass of both.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from pathlib import Path

import torch

from service.engine import Draw, Engine, Job, JobResult
from service.loader import LoadedModel, load_model
from service.process import keep_freed_memory


class Instant:
    """A field that answers every pass at once (zeros), for the engine's own share of a pass."""

    def __init__(self) -> None:
        self._answers: dict[tuple[int, ...], torch.Tensor] = {}

    def evaluate(self, t: torch.Tensor, x: torch.Tensor, *_: object) -> torch.Tensor:
        answer = self._answers.get(tuple(x.shape))
        if answer is None:
            answer = self._answers[tuple(x.shape)] = torch.zeros_like(x)
        return answer


def drive(model: LoadedModel, jobs: int, rows: int, steps: int, seconds: float) -> dict[str, float]:
    """Keep `jobs` requests in flight for `seconds`; requests/s, passes/s and us per pass."""
    engine = Engine(
        model,
        max_batch_rows=max(16_384, jobs * rows),
        block_rows=max(rows, 4096),
        max_queue_rows=10**9,
    )
    seeds = itertools.count()
    finished = 0

    def submit() -> None:
        job = Job(z0=Draw(next(seeds), rows), solver="euler", num_steps=steps, width=model.dim)
        job.on_done = done
        engine.submit(job)

    def done(result: JobResult | None, error: Exception | None) -> None:
        nonlocal finished
        if error is not None:
            raise error
        finished += 1
        submit()

    # Requests arrive spread over one request's passes, so each is at a step of its own and one
    # ends every few passes, as under steady load (not all at once, as they would if started
    # together).
    for i in range(jobs):
        submit()
        while engine.stats.passes < (i + 1) * steps // jobs:
            engine.turn()
    for _ in range(steps):
        engine.turn()
    finished, passes = 0, engine.stats.passes
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.turn()
    elapsed = time.perf_counter() - start
    passes = engine.stats.passes - passes
    if engine.failure is not None:
        raise SystemExit(f"bench: the engine failed: {engine.failure}")
    return {
        "requests_per_s": finished / elapsed,
        "passes_per_s": passes / elapsed,
        "us_per_pass": 1e6 * elapsed / passes,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/four-gaussians"))
    parser.add_argument("--jobs", type=int, default=62)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fused-min-rows", type=int, default=128)
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the service does
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the engine runs passes of fewer than 4,096 rows
    try:
        with torch.no_grad():
            run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> None:
    model = load_model(
        args.model_dir, torch.device("cpu"), fused_min_rows=args.fused_min_rows, warmup_passes=2
    )
    instant = dataclasses.replace(model, field=Instant())
    print(
        f"bench: {args.model_dir.name}, {args.jobs} requests of {args.rows} x {args.steps} "
        f"in flight, {args.seconds:g} s a figure"
    )
    for _ in range(args.runs):
        served = drive(model, args.jobs, args.rows, args.steps, args.seconds)
        alone = drive(instant, args.jobs, args.rows, args.steps, args.seconds)
        print(
            f"served field: {served['requests_per_s']:,.0f} req/s, "
            f"{served['passes_per_s']:,.0f} passes/s, {served['us_per_pass']:.0f} us/pass | "
            f"instant field: {alone['requests_per_s']:,.0f} req/s, "
            f"{alone['us_per_pass']:.0f} us/pass (the engine's own share: "
            f"{alone['us_per_pass'] / served['us_per_pass']:.0%})"
        )


if __name__ == "__main__":
    main()
