"""Throughput, latency and memory of a real `python -m service`, beside the reference sampler.

    python -m bench.throughput [--device cpu|cuda] [--quick] [--models-dir DIR --model NAME]
                               [--cases check,1,2,3,litserve,4,5,flops,cuda] [--json FILE]
                               [--server-env FLOW_NAME=VALUE ...]

The server runs in its own process on a free loopback port. The baseline is the reference post's
Euler sampler (a time column built by `repeat` every step, `torch.cat([x, t])` inside forward, a
clone of x kept every step, `torch.stack` at the end), re-implemented here and given the served
model's own weights, run in this process at torch's default thread count and at one thread, the
faster counting (on a busy machine two threads can spend most of their time in OpenMP barriers).
Every figure is printed beside its baseline, measured in the same run, as a ratio:

1. one large request (65,536 x 100, .npy over HTTP): samples x steps per second;
2. one small request (16 x 100): median latency of sequential requests;
3. 64 connections asking 16 x 100 for 10 s (driven by `wrk`): requests per second (bar 8x
   the post answering them one by one), p50, p99;
L. ("litserve") the same load answered in JSON, against the post's sampler behind LitServe's
   dynamic batching (`max_batch_size` 64, `batch_timeout` 5 ms; `bench/litserve_app.py`, LitServe
   installed by the bench when missing): requests per second (bar 1.5x) and p99 (bar: lower);
4. head of line: p99 latency of 20 small requests (16 x 20) sent while a 262,144 x 100 one runs,
   as a share of the large request's duration;
5. memory: peak resident growth of a fresh server answering 1,000,000 x 100, against
   3 x the answer's size + 150 MB;
and the large request's FLOP/s as a share of a plain float32 matmul's, measured in the same run.
With `--device cuda`, also the per-step time at 16 rows and samples x steps per second at
1,048,576 rows. Load for case 3 comes from `wrk` when it is installed, else from httpx.

The model is `models/four-gaussians` when it exists, else a post-style network written here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench.common import (
    MB,
    REPO_ROOT,
    REQUEST_TIMEOUT_S,
    PostFlow,
    Server,
    free_port,
    rss_bytes,
    running,
    serve,
    write_post_model,
)
from service.process import keep_freed_memory

BUNDLED_MODEL = "four-gaussians"
NPY = "application/x-npy"


# ----------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size the bench uses; `FULL` is the specification, `QUICK` a smoke run."""

    steps: int = 100
    large_rows: int = 65_536
    small_rows: int = 16
    small_requests: int = 50
    concurrency: int = 64
    load_seconds: float = 10.0
    hol_large_rows: int = 262_144
    hol_small_rows: int = 16
    hol_small_steps: int = 20
    hol_small_requests: int = 20
    memory_rows: int = 1_000_000
    matmul_size: int = 4096
    matmul_reps: int = 3
    repeats: int = 2  # the large request and its baseline: best of this many
    check_rows: int = 64
    cuda_rows: int = 1_048_576
    cuda_small_steps: tuple[int, int] = (20, 1000)
    cuda_small_requests: int = 15


FULL = Sizes()
QUICK = Sizes(
    large_rows=8192,
    small_requests=15,
    concurrency=16,
    load_seconds=3.0,
    hol_large_rows=16_384,
    hol_small_requests=10,
    memory_rows=50_000,
    matmul_size=1024,
    matmul_reps=2,
    repeats=1,
    cuda_rows=131_072,
    cuda_small_steps=(10, 200),
    cuda_small_requests=7,
)
ALL_CASES = ("check", "1", "2", "3", "litserve", "4", "5", "flops", "cuda")


def default_cases(device: str) -> tuple[str, ...]:
    """Every case; the per-step and many-rows figures ('cuda') only on a GPU unless asked for."""
    return ALL_CASES if device == "cuda" else tuple(c for c in ALL_CASES if c != "cuda")


# ----------------------------------------------------------------------------- the baseline


def post_sample(flow: torch.nn.Module, x0: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The reference post's Euler sampler, as the post writes it.

    x0: (batch, dim) -> every state, (num_steps + 1, batch, dim); the samples are the last.
    """
    dt = 1.0 / num_steps
    x = x0
    states = [x.clone()]
    with torch.no_grad():
        for k in range(num_steps):
            t = torch.tensor([[k * dt]], device=x.device).repeat(x.shape[0], 1)
            x = x + dt * flow(t, x)
            states.append(x.clone())
    return torch.stack(states)


class NotPostArchitecture(ValueError):
    """The served model's weights do not fit the post's network."""


def load_post_flow(model_pt: Path, device: torch.device) -> PostFlow:
    """The post's network holding the weights of the TorchScript module in `model_pt`.

    The parameters are read in order as (weight, bias) pairs of Linear layers; the result is
    checked against the loaded module on a probe input.
    """
    scripted = torch.jit.load(str(model_pt), map_location="cpu").eval()
    params = [p.detach() for _, p in scripted.named_parameters()]
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    while params:
        weight = params.pop(0)
        if weight.dim() != 2 or not params or params[0].shape != (weight.shape[0],):
            raise NotPostArchitecture(
                f"{model_pt}: parameters are not (weight, bias) pairs of Linear layers"
            )
        pairs.append((weight, params.pop(0)))
    if not pairs:
        raise NotPostArchitecture(f"{model_pt}: no parameters")
    widths = [pairs[0][0].shape[1]] + [w.shape[0] for w, _ in pairs]
    if any(w.shape[1] != fan_in for (w, _), fan_in in zip(pairs, widths, strict=False)):
        raise NotPostArchitecture(f"{model_pt}: Linear layer sizes do not chain")
    dim = widths[-1]
    if widths[0] != dim + 1:
        raise NotPostArchitecture(f"{model_pt}: first layer takes {widths[0]} inputs, not dim + 1")
    flow = PostFlow(widths)
    with torch.no_grad():
        for linear, (weight, bias) in zip(flow.linears(), pairs, strict=True):
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
    flow.eval()
    generator = torch.Generator().manual_seed(0)
    t = torch.rand(257, 1, generator=generator)
    x = 3 * torch.randn(257, dim, generator=generator)
    with torch.no_grad():
        if not torch.allclose(flow(t, x), scripted(t, x), rtol=1e-4, atol=1e-5):
            raise NotPostArchitecture(
                f"{model_pt}: the post's network (ELU MLP on cat([x, t])) with these weights "
                "does not reproduce the model"
            )
    return flow.to(device)


def flops_per_row_eval(flow: PostFlow) -> int:
    """Multiply-adds of one row through the network, counted as 2 FLOPs each."""
    return 2 * sum(linear.in_features * linear.out_features for linear in flow.linears())


def draw_x0(rows: int, dim: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_post_sample(
    flow: PostFlow, rows: int, num_steps: int, device: torch.device, repeats: int = 1
) -> list[float]:
    """Seconds of each of `repeats` runs of the post's sampler (start points drawn inside)."""
    dim = flow.linears()[-1].out_features
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        x0 = torch.randn(rows, dim, device=device)
        post_sample(flow, x0, num_steps)[-1]
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def baseline_threads(device: torch.device) -> list[int]:
    """Intra-op thread counts the baseline is timed with: torch's default, and 1.

    On a busy machine a parallel matmul of a few rows can wait on a descheduled thread for
    milliseconds; the baseline gets whichever setting is faster, so no ratio is flattered.
    """
    default = torch.get_num_threads()
    return [default] if device.type == "cuda" or default == 1 else [default, 1]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def time_post_best(
    flow: PostFlow, rows: int, num_steps: int, device: torch.device, repeats: int
) -> dict[int, list[float]]:
    """Seconds of `repeats` runs of the post's sampler under each of `baseline_threads`."""
    times: dict[int, list[float]] = {}
    for count in baseline_threads(device):
        with torch_threads(count):
            time_post_sample(flow, rows, num_steps, device, repeats=min(3, repeats))  # warm-up
            times[count] = time_post_sample(flow, rows, num_steps, device, repeats=repeats)
    return times


def matmul_flops(size: int, reps: int, device: torch.device) -> float:
    """FLOP/s of a plain float32 (size x size) @ (size x size), best of `reps`."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    torch.mm(a, b, out=out)  # warm-up
    synchronize(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


# ----------------------------------------------------------------------------- the model


def prepare_models(
    workdir: Path, models_dir: Path | None = None, model: str | None = None
) -> tuple[Path, str, str]:
    """(models dir to serve, model name, where it came from)."""
    if models_dir is not None:
        if model is None:
            names = sorted(p.name for p in models_dir.iterdir() if (p / "model.pt").is_file())
            if not names:
                raise SystemExit(f"bench: no model folder under {models_dir}")
            model = names[0]
        return models_dir, model, f"{models_dir / model}"
    bundled = REPO_ROOT / "models" / BUNDLED_MODEL
    served = workdir / "models"
    served.mkdir(parents=True, exist_ok=True)
    if (bundled / "model.pt").is_file() and (bundled / "manifest.json").is_file():
        shutil.copytree(bundled, served / BUNDLED_MODEL, dirs_exist_ok=True)
        return served, BUNDLED_MODEL, f"models/{BUNDLED_MODEL}"
    write_post_model(served, "post-bench")
    return served, "post-bench", "post-style network, random weights (models/four-gaussians absent)"


# ----------------------------------------------------------------------------- the server


def sample_body(model: str, rows: int, steps: int, seed: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "num_samples": rows, "num_steps": steps}
    if seed is not None:
        body["seed"] = seed
    return body


def post_npy(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, np.ndarray]:
    """(seconds, answer) of one POST /sample asking for .npy."""
    start = time.perf_counter()
    response = client.post(f"{url}/sample", json=body, headers={"Accept": NPY})
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"/sample answered {response.status_code}: {response.text[:300]}")
    return elapsed, np.load(io.BytesIO(response.content))


def wait_idle(url: str, model: str, timeout: float = 60.0) -> None:
    """Wait until the server's queue for `model` is empty (work from a load run drains)."""
    deadline = time.monotonic() + timeout
    needle = f'flowserve_queue_rows{{model="{model}"}}'
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(f"{url}/metrics", timeout=5.0).text
            values = [line.split()[-1] for line in text.splitlines() if line.startswith(needle)]
            if not values or float(values[0]) == 0.0:
                return
        time.sleep(0.1)


# ----------------------------------------------------------------------------- load generation


@dataclasses.dataclass
class LoadResult:
    generator: str
    ok: int
    errors: int
    seconds: float
    p50_s: float
    p99_s: float

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def find_wrk(say: Callable[[str], None] = print) -> str | None:
    """The `wrk` executable, or None (case 3 then drives the load from httpx, which tops out
    lower: install wrk, e.g. `apt-get install wrk`, for the published figures)."""
    found = shutil.which("wrk")
    if found is None:
        say("bench: wrk is not installed (apt-get install wrk); case 3 uses httpx instead")
    return found


WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "{accept}"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("FLOWBENCH requests=%d duration_us=%d status=%d connect=%d read=%d "
    .. "write=%d timeout=%d p50_us=%d p99_us=%d\\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(
    wrk: str,
    url: str,
    body: dict[str, Any],
    connections: int,
    seconds: float,
    workdir: Path,
    *,
    path: str = "/sample",
    accept: str = NPY,
) -> LoadResult:
    """`connections` connections POSTing `body` to `path` for `seconds`."""
    script = workdir / "sample.lua"
    script.write_text(WRK_SCRIPT.format(body=json.dumps(body), accept=accept))
    command = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    command += ["--timeout", "60s", "-s", str(script), f"{url}{path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("FLOWBENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    fields = {k: int(v) for k, v in (part.split("=") for part in line.split()[1:])}
    errors = fields["status"] + fields["timeout"]
    return LoadResult(
        generator="wrk",
        ok=fields["requests"] - fields["status"],
        errors=errors + fields["connect"] + fields["read"] + fields["write"],
        seconds=fields["duration_us"] / 1e6,
        p50_s=fields["p50_us"] / 1e6,
        p99_s=fields["p99_us"] / 1e6,
    )


def run_httpx_load(
    url: str,
    body: dict[str, Any],
    connections: int,
    seconds: float,
    *,
    path: str = "/sample",
    accept: str = NPY,
) -> LoadResult:
    """The same load from an asyncio httpx client (tops out near 250 requests/s on 2 cores)."""
    import asyncio

    async def drive() -> tuple[list[float], int, float]:
        latencies: list[float] = []
        errors = 0
        limits = httpx.Limits(max_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
            start = time.perf_counter()
            stop_at = start + seconds

            async def worker() -> None:
                nonlocal errors
                while time.perf_counter() < stop_at:
                    began = time.perf_counter()
                    response = await client.post(
                        f"{url}{path}", json=body, headers={"Accept": accept}
                    )
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - began)
                    else:
                        errors += 1

            await asyncio.gather(*(worker() for _ in range(connections)))
            return latencies, errors, time.perf_counter() - start

    latencies, errors, elapsed = asyncio.run(drive())
    lat = np.array(latencies or [float("nan")])
    return LoadResult(
        "httpx", len(latencies), errors, elapsed, *np.percentile(lat, [50, 99]).tolist()
    )


# ----------------------------------------------------------------------------- figures


@dataclasses.dataclass
class Figure:
    """One row of the table. `higher_is_better` says which way the bar points."""

    name: str
    unit: str
    flowserve: float
    baseline: float
    baseline_label: str
    bar: float | None
    higher_is_better: bool = True
    notes: str = ""

    @property
    def ratio(self) -> float:
        return self.flowserve / self.baseline if self.baseline else float("nan")

    @property
    def passed(self) -> bool | None:
        if self.bar is None:
            return None
        return self.ratio >= self.bar if self.higher_is_better else self.ratio <= self.bar

    def as_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "ratio": self.ratio,
            "passed": self.passed,
        }


@dataclasses.dataclass
class Context:
    """What every case needs: the running server, the model, the baseline and the sizes."""

    url: str
    model: str
    flow: PostFlow
    device: torch.device
    sizes: Sizes
    workdir: Path
    details: dict[str, Any]
    say: Callable[[str], None] = print
    wrk: str | None = None


def case_check(ctx: Context) -> Figure:
    """The served answer for given start points against the post's sampler on the same points."""
    dim = ctx.flow.linears()[-1].out_features
    x0 = draw_x0(ctx.sizes.check_rows, dim, torch.device("cpu"), seed=3)
    body = {"model": ctx.model, "x0": x0.tolist(), "num_steps": ctx.sizes.steps}
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        response = client.post(f"{ctx.url}/sample", json=body)
    response.raise_for_status()
    served = np.asarray(response.json()["samples"], dtype=np.float64)
    expected = post_sample(ctx.flow, x0.to(ctx.device), ctx.sizes.steps)[-1].cpu().double()
    scale = float(expected.abs().max())
    error = float(np.abs(served - expected.numpy()).max())
    return Figure(
        "agreement with the post (max |diff| / max |x|)",
        "",
        error / scale,
        1.0,
        "1",
        1e-4,
        higher_is_better=False,
        notes=f"{ctx.sizes.check_rows} x {ctx.sizes.steps}, given x0",
    )


def case_large(ctx: Context) -> Figure:
    """1. One large request: samples x steps per second, best of `repeats`, both sides."""
    s = ctx.sizes
    work = s.large_rows * s.steps
    body = sample_body(ctx.model, s.large_rows, s.steps, seed=1)
    served: list[float] = []
    baseline: dict[int, list[float]] = {count: [] for count in baseline_threads(ctx.device)}
    for count in baseline:
        with torch_threads(count):
            time_post_sample(ctx.flow, min(s.large_rows, 4096), 10, ctx.device)  # warm-up
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        post_npy(client, ctx.url, sample_body(ctx.model, 1024, 10))  # warm-up
        for _ in range(s.repeats):  # alternated, so a burst of load elsewhere hits both sides
            for count in baseline:
                with torch_threads(count):
                    baseline[count] += time_post_sample(ctx.flow, s.large_rows, s.steps, ctx.device)
            seconds, answer = post_npy(client, ctx.url, body)
            if answer.shape != (s.large_rows, ctx.flow.linears()[-1].out_features):
                raise RuntimeError(f"/sample answered shape {answer.shape}")
            served.append(seconds)
    best = min(min(times) for times in baseline.values())
    ctx.details["large"] = {
        "served_s": served,
        "baseline_s_by_threads": baseline,
        "baseline_s": best,
        "work": work,
    }
    return Figure(
        f"1. large request {s.large_rows:,} x {s.steps}",
        "samples*steps/s",
        work / min(served),
        work / best,
        "post in-process",
        1.5,
        notes=f"best of {s.repeats}: {min(served):.2f} s vs {best:.2f} s; post "
        + _by_threads({count: min(times) for count, times in baseline.items()}, "s"),
    )


def _by_threads(values: dict[int, float], unit: str, scale: float = 1.0) -> str:
    """'1.20 s at 2 threads, 0.70 s at 1': the baseline under each thread setting."""
    parts = [f"{scale * value:.3g} {unit} at {count}" for count, value in values.items()]
    return ", ".join(parts) + " threads"


def _small_baseline(ctx: Context) -> list[float]:
    """Times of the post's sampler on one small request, under its faster thread setting."""
    cached = ctx.details.get("small_baseline_s")
    if cached is None:
        s = ctx.sizes
        times = time_post_best(ctx.flow, s.small_rows, s.steps, ctx.device, s.small_requests)
        ctx.details["small_baseline_s_by_threads"] = times
        cached = min(times.values(), key=lambda t: float(np.median(t)))
        ctx.details["small_baseline_s"] = cached
    return cached


def case_small(ctx: Context) -> Figure:
    """2. One small request at a time: median latency over HTTP vs the post's time in-process."""
    s = ctx.sizes
    body = sample_body(ctx.model, s.small_rows, s.steps)
    latencies = []
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        for _ in range(3):
            post_npy(client, ctx.url, body)
        for _ in range(s.small_requests):
            latencies.append(post_npy(client, ctx.url, body)[0])
    baseline = _small_baseline(ctx)
    ctx.details["small"] = {"served_s": latencies, "baseline_s": baseline}
    return Figure(
        f"2. small request {s.small_rows} x {s.steps}, median latency",
        "ms",
        1e3 * float(np.median(latencies)),
        1e3 * float(np.median(baseline)),
        "post in-process",
        1.0,
        higher_is_better=False,
        notes=f"{s.small_requests} sequential requests; post median "
        + _by_threads(
            {c: float(np.median(t)) for c, t in ctx.details["small_baseline_s_by_threads"].items()},
            "ms",
            1e3,
        ),
    )


def case_concurrent(ctx: Context) -> Figure:
    """3. Many connections asking small requests: requests/s vs the post answering one by one."""
    s = ctx.sizes
    body = sample_body(ctx.model, s.small_rows, s.steps)
    result = drive_load(ctx, ctx.url, body)
    wait_idle(ctx.url, ctx.model)
    # One by one, the post answers a request per median time: the median shrugs off the
    # bursts that other processes on a shared machine put into a few of the timed runs.
    baseline_rps = 1.0 / float(np.median(_small_baseline(ctx)))
    ctx.details["concurrent"] = {**dataclasses.asdict(result), "rps": result.rps}
    return Figure(
        f"3. {s.concurrency} connections x {s.small_rows} x {s.steps}, {s.load_seconds:g} s",
        "requests/s",
        result.rps,
        baseline_rps,
        "post one by one",
        8.0,
        notes=(
            f"{result.generator}: p50 {1e3 * result.p50_s:.1f} ms, p99 {1e3 * result.p99_s:.1f} ms"
            f", {result.ok} ok, {result.errors} errors"
        ),
    )


def drive_load(
    ctx: Context, url: str, body: dict[str, Any], path: str = "/sample", accept: str = NPY
) -> LoadResult:
    """`ctx.sizes.concurrency` connections POSTing `body` for `ctx.sizes.load_seconds`."""
    s = ctx.sizes
    if ctx.wrk is not None:
        return run_wrk(
            ctx.wrk, url, body, s.concurrency, s.load_seconds, ctx.workdir, path=path, accept=accept
        )
    ctx.say(
        "bench: WARNING: wrk unavailable, driving the load with httpx: it tops out near "
        "250 requests/s on 2 cores, so this figure measures the client, not the server"
    )
    return run_httpx_load(url, body, s.concurrency, s.load_seconds, path=path, accept=accept)


LITSERVE = "litserve==0.2.19"
"""The LitServe release case 'litserve' runs against (installed by the bench when missing)."""


def ensure_litserve(say: Callable[[str], None]) -> None:
    if importlib.util.find_spec("litserve") is None:
        say(f"bench: installing {LITSERVE} for case 'litserve'")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", LITSERVE], check=True)
        importlib.invalidate_caches()


@contextlib.contextmanager
def serve_litserve(model_dir: Path, log: Path) -> Iterator[Server]:
    """`bench.litserve_app` on `model_dir` on a free loopback port, ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "bench.litserve_app", "--model-dir", str(model_dir)]
    command += ["--port", str(port)]

    def probe() -> httpx.Response:
        return httpx.post(f"{url}/predict", json={"num_samples": 1, "num_steps": 1}, timeout=5.0)

    with running(command, url, log, {}, probe) as server:
        yield server


def case_litserve(ctx: Context, model_dir: Path) -> list[Figure]:
    """L. Case 3's load, answered in JSON, against the post's sampler behind LitServe's dynamic
    batching (max_batch_size 64, batch_timeout 5 ms): requests/s, and p99 (lower is better)."""
    s = ctx.sizes
    ensure_litserve(ctx.say)
    body = sample_body(ctx.model, s.small_rows, s.steps)
    with serve_litserve(model_dir, ctx.workdir / "litserve.log") as lit:
        seeded = {**body, "seed": 11}
        ours = httpx.post(f"{ctx.url}/sample", json=seeded, timeout=60).json()["samples"]
        theirs = httpx.post(f"{lit.url}/predict", json=seeded, timeout=60).json()["samples"]
        gap = float(np.abs(np.asarray(ours) - np.asarray(theirs)).max())
        ctx.say(f"bench: flowserve and LitServe answers for one seed differ by at most {gap:.2e}")
        flow = drive_load(ctx, ctx.url, body, accept="application/json")
        wait_idle(ctx.url, ctx.model)
        other = drive_load(ctx, lit.url, body, path="/predict", accept="application/json")
    ctx.details["litserve"] = {
        "flowserve": {**dataclasses.asdict(flow), "rps": flow.rps},
        "litserve": {**dataclasses.asdict(other), "rps": other.rps},
        "same_seed_max_abs_gap": gap,
    }
    name = f"L. {s.concurrency} connections x {s.small_rows} x {s.steps}, JSON"
    return [
        Figure(
            f"{name}, {s.load_seconds:g} s",
            "requests/s",
            flow.rps,
            other.rps,
            "LitServe (batch 64, 5 ms)",
            1.5,
            notes=f"{flow.ok} and {other.ok} ok, {flow.errors} and {other.errors} errors",
        ),
        Figure(
            f"{name}: p99",
            "ms",
            1e3 * flow.p99_s,
            1e3 * other.p99_s,
            "LitServe (batch 64, 5 ms)",
            1.0,
            higher_is_better=False,
            notes=f"p50 {1e3 * flow.p50_s:.1f} vs {1e3 * other.p50_s:.1f} ms",
        ),
    ]


def case_head_of_line(ctx: Context) -> Figure:
    """4. Small requests sent while a large one runs: their p99 vs the large one's duration."""
    s = ctx.sizes
    rate = ctx.details.get("large_rate")
    if rate is None:  # no case 1 in this run: time a slice of the large request
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            rows = max(1, s.hol_large_rows // 16)
            seconds, _ = post_npy(client, ctx.url, sample_body(ctx.model, rows, s.steps))
        rate = rows * s.steps / seconds
    expected = s.hol_large_rows * s.steps / rate
    # Spread the small requests over the first part of the large one's expected run.
    first, last = 0.05 * expected, 0.4 * expected
    offsets = np.linspace(first, last, s.hol_small_requests)
    small_body = sample_body(ctx.model, s.hol_small_rows, s.hol_small_steps)
    large_body = sample_body(ctx.model, s.hol_large_rows, s.steps, seed=2)
    start = time.perf_counter()
    large_done: list[float] = []

    def large() -> float:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            seconds, _ = post_npy(client, ctx.url, large_body)
        large_done.append(time.perf_counter())
        return seconds

    def small(offset: float) -> tuple[float, float]:
        time.sleep(max(0.0, start + offset - time.perf_counter()))
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            seconds, _ = post_npy(client, ctx.url, small_body)
        return seconds, time.perf_counter()

    with ThreadPoolExecutor(max_workers=s.hol_small_requests + 1) as pool:
        large_future = pool.submit(large)
        smalls = [pool.submit(small, float(offset)) for offset in offsets]
        large_seconds = large_future.result()
        answers = [future.result() for future in smalls]
    latencies = [seconds for seconds, _ in answers]
    during = sum(finished < large_done[0] for _, finished in answers)
    p99 = float(np.percentile(latencies, 99))
    ctx.details["head_of_line"] = {
        "large_s": large_seconds,
        "small_s": latencies,
        "small_finished_during_large": during,
    }
    return Figure(
        f"4. head of line: {s.hol_small_requests} x ({s.hol_small_rows} x {s.hol_small_steps}) "
        f"during {s.hol_large_rows:,} x {s.steps}",
        "s",
        p99,
        large_seconds,
        "large request's time",
        0.10,
        higher_is_better=False,
        notes=f"p99 of the small ones; {during}/{len(latencies)} finished before the large one",
    )


class PeakSampler:
    """Samples a process's VmRSS every `interval` seconds on a thread; `peak` is the largest."""

    def __init__(self, pid: int, interval: float = 0.003) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, rss_bytes(self.pid)["VmRSS"])
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def case_memory(ctx: Context, server: Server) -> Figure:
    """5. Peak resident growth of `server` (a fresh process) answering one huge request."""
    s = ctx.sizes
    dim = ctx.flow.linears()[-1].out_features
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        post_npy(client, server.url, sample_body(ctx.model, 16, 2))
        time.sleep(0.3)
        before = rss_bytes(server.pid)
        with PeakSampler(server.pid) as sampler:
            seconds, answer = post_npy(
                client, server.url, sample_body(ctx.model, s.memory_rows, s.steps, seed=4)
            )
        after = rss_bytes(server.pid)
    peak = sampler.peak
    if after["VmHWM"] > before["VmHWM"]:  # the high-water mark catches peaks between samples
        peak = max(peak, after["VmHWM"])
    growth = peak - before["VmRSS"]
    answer_bytes = s.memory_rows * dim * 4
    budget = 3 * answer_bytes + 150 * MB
    ctx.details["memory"] = {
        "rss_before": before["VmRSS"],
        "peak_rss": peak,
        "rss_after": after["VmRSS"],
        "answer_bytes": answer_bytes,
        "request_s": seconds,
        "answer_shape": list(answer.shape),
    }
    return Figure(
        f"5. memory: {s.memory_rows:,} x {s.steps} (.npy)",
        "MB",
        growth / MB,
        budget / MB,
        "3 x answer + 150 MB",
        1.0,
        higher_is_better=False,
        notes=f"peak RSS growth; answer {answer_bytes / MB:.1f} MB, took {seconds:.1f} s",
    )


def case_flops(ctx: Context) -> list[Figure]:
    """The large request's (and the baseline's) FLOP/s as a share of a plain matmul's."""
    s = ctx.sizes
    # A GPU finishes a 4096^2 product in about a millisecond: a larger one, more often.
    size, reps = (
        (max(s.matmul_size, 8192), 10)
        if ctx.device.type == "cuda"
        else (s.matmul_size, s.matmul_reps)
    )
    peak = matmul_flops(size, reps, ctx.device)
    per_row = flops_per_row_eval(ctx.flow)
    large = ctx.details.get("large")
    if large is None:
        raise RuntimeError("the FLOP/s figure needs case 1 in the same run")
    served = per_row * large["work"] / min(large["served_s"])
    baseline = per_row * large["work"] / large["baseline_s"]
    ctx.details["flops"] = {"matmul": peak, "per_row_eval": per_row, "served": served}
    note = f"{per_row} FLOP per row-eval; matmul {size}^2"
    return [
        Figure(
            "FLOP/s share, large request",
            "GFLOP/s",
            served / 1e9,
            peak / 1e9,
            "float32 matmul",
            None,
            notes=note,
        ),
        Figure(
            "FLOP/s share, post in-process",
            "GFLOP/s",
            baseline / 1e9,
            peak / 1e9,
            "float32 matmul",
            None,
            notes=note,
        ),
    ]


def cuda_figures(ctx: Context, label: str = "") -> list[Figure]:
    """Per-step time at a few rows and samples x steps/s at many rows, server vs post."""
    s = ctx.sizes
    low, high = s.cuda_small_steps
    medians = {}
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        for steps in (low, high):
            body = sample_body(ctx.model, s.small_rows, steps)
            post_npy(client, ctx.url, body)
            medians[steps] = float(
                np.median(
                    [post_npy(client, ctx.url, body)[0] for _ in range(s.cuda_small_requests)]
                )
            )
        served_step = (medians[high] - medians[low]) / (high - low)
        work = s.cuda_rows * s.steps
        post_npy(client, ctx.url, sample_body(ctx.model, 4096, 10))
        served_big = min(
            post_npy(client, ctx.url, sample_body(ctx.model, s.cuda_rows, s.steps))[0]
            for _ in range(s.repeats)
        )
    post = {
        steps: float(
            np.median(
                time_post_sample(ctx.flow, s.small_rows, steps, ctx.device, s.cuda_small_requests)
            )
        )
        for steps in (low, high)
    }
    post_step = (post[high] - post[low]) / (high - low)
    time_post_sample(ctx.flow, 4096, 10, ctx.device)
    post_big = min(time_post_sample(ctx.flow, s.cuda_rows, s.steps, ctx.device, s.repeats))
    ctx.details[f"per_step_and_many_rows{label}"] = {
        "served_median_s": medians,
        "post_median_s": post,
        "served_large_s": served_big,
        "post_large_s": post_big,
    }
    return [
        Figure(
            f"{ctx.device.type}: per-step time at {s.small_rows} rows{label}",
            "us",
            1e6 * served_step,
            1e6 * post_step,
            "post in-process",
            None,
            higher_is_better=False,
            notes=f"difference of {high}- and {low}-step medians",
        ),
        Figure(
            f"{ctx.device.type}: {s.cuda_rows:,} x {s.steps}{label}",
            "samples*steps/s",
            work / served_big,
            work / post_big,
            "post in-process",
            None,
        ),
    ]


# ----------------------------------------------------------------------------- running


def _cell(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if abs(value) >= 1e5:
        return f"{value:.3g}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_table(figures: Sequence[Figure]) -> str:
    header = ["figure", "unit", "flowserve", "baseline", "ratio", "bar", "result", "notes"]
    rows = []
    for f in figures:
        bar = "-" if f.bar is None else f"{'>=' if f.higher_is_better else '<='} {f.bar:g}"
        result = {None: "info", True: "PASS", False: "FAIL"}[f.passed]
        baseline = f"{_cell(f.baseline)} ({f.baseline_label})"
        rows.append(
            [f.name, f.unit, _cell(f.flowserve), baseline, _cell(f.ratio), bar, result, f.notes]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def run_bench(
    *,
    device: str = "cpu",
    sizes: Sizes = FULL,
    cases: Sequence[str] | None = None,
    models_dir: Path | None = None,
    model: str | None = None,
    workdir: Path,
    fresh_memory_server: bool = True,
    server_env: dict[str, str] | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the chosen cases; returns {"figures": [...], "details": {...}, ...} (JSON-ready).

    The memory case runs on a fresh server so that earlier cases' allocations do not hide its
    growth; `fresh_memory_server=False` reuses the first one (for a smoke run). `server_env`:
    FLOW_* settings for the servers (to compare engine settings).
    """
    torch_device = torch.device(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA device is available")
    served_dir, model, origin = prepare_models(workdir, models_dir, model)
    flow = load_post_flow(served_dir / model / "model.pt", torch_device)
    say(f"bench: model {model} ({origin}) on {device}; torch threads {torch.get_num_threads()}")
    # The server keeps freed memory for reuse (service.server.keep_freed_memory); the baseline
    # gets the same allocator so the ratios compare samplers, not malloc settings.
    same_allocator = keep_freed_memory()
    say(f"bench: baseline allocator keeps freed memory like the server: {same_allocator}")
    wants = set(default_cases(device) if cases is None else cases)
    loaded = {"3", "litserve"} & wants
    wrk = find_wrk(say) if loaded else None
    if loaded:
        say(f"bench: load generator {wrk or 'httpx (wrk unavailable)'}")
    details: dict[str, Any] = {}
    figures: list[Figure] = []
    log = workdir / "server.log"

    def record(new: Figure | list[Figure]) -> None:
        for figure in new if isinstance(new, list) else [new]:
            figures.append(figure)
            say(
                f"bench: {figure.name}: {_cell(figure.flowserve)} {figure.unit} vs "
                f"{_cell(figure.baseline)} -> {_cell(figure.ratio)}"
            )

    with serve(served_dir, device, log, env=server_env) as server:
        ctx = Context(server.url, model, flow, torch_device, sizes, workdir, details, say, wrk)
        steps: list[tuple[str, Callable[[], Figure | list[Figure]]]] = [
            ("check", lambda: case_check(ctx)),
            ("1", lambda: case_large(ctx)),
            ("flops", lambda: case_flops(ctx)),
            ("2", lambda: case_small(ctx)),
            ("3", lambda: case_concurrent(ctx)),
            ("litserve", lambda: case_litserve(ctx, served_dir / model)),
            ("4", lambda: case_head_of_line(ctx)),
        ]
        for name, step in steps:
            if name not in wants or (name == "flops" and "1" not in wants):
                continue
            record(step())
            if name == "1":
                details["large_rate"] = figures[-1].flowserve
        if "cuda" in wants:
            record(cuda_figures(ctx))
        if "5" in wants and not fresh_memory_server:
            record(case_memory(ctx, server))
    if "5" in wants and fresh_memory_server:
        with serve(served_dir, device, log, env=server_env) as fresh:
            ctx = Context(fresh.url, model, flow, torch_device, sizes, workdir, details, say, wrk)
            record(case_memory(ctx, fresh))
    return {
        "device": device,
        "server_env": server_env or {},
        "model": model,
        "model_origin": origin,
        "sizes": dataclasses.asdict(sizes),
        "load_generator": "wrk" if wrk else ("httpx" if loaded else None),
        "torch_threads": torch.get_num_threads(),
        "figures": [f.as_dict() for f in figures],
        "details": details,
        "table": format_table(figures),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (< 1 minute)")
    parser.add_argument("--models-dir", type=Path, help="serve this folder of model folders")
    parser.add_argument("--model", help="model to bench (default: the first in the folder)")
    parser.add_argument(
        "--cases",
        help=f"comma-separated, of {','.join(ALL_CASES)} (default: all; cuda only on a GPU)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="FLOW_NAME=VALUE",
        help="a setting for the servers started (repeatable), e.g. FLOW_TORCH_THREADS=1",
    )
    args = parser.parse_args(argv)
    unknown = set(args.cases.split(",") if args.cases else ()) - set(ALL_CASES)
    if unknown:
        parser.error(f"--cases: unknown {', '.join(sorted(unknown))}")
    if any(not item.startswith("FLOW_") or "=" not in item for item in args.server_env):
        parser.error("--server-env: expected FLOW_NAME=VALUE")
    if args.model and not args.models_dir:
        parser.error("--model needs --models-dir")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flowserve-bench-") as tmp:
        try:
            results = run_bench(
                device=args.device,
                sizes=QUICK if args.quick else FULL,
                cases=args.cases.split(",") if args.cases else None,
                models_dir=args.models_dir,
                model=args.model,
                workdir=Path(tmp),
                server_env=dict(item.split("=", 1) for item in args.server_env),
            )
        except NotPostArchitecture as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 2
    print()
    print(results["table"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"\nbench: results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
