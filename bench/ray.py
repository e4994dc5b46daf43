"""flowserve through Ray Serve beside `python -m service`, on the same machine, in the same run.

    python -m bench.ray [--quick] [--cases load,small,autoscale,rolling] [--json FILE]
                        [--ray-env NAME=VALUE ...]

A Ray cluster of two nodes on this machine (bench.ray_cluster: `ray start --head`, `ray start
--address`), flowserve deployed from deploy/ray/serve.yaml with the changes a one-machine
cluster needs (one proxy, loopback) and the replica count of each case:

- load: 64 connections asking 16 samples x 100 steps (JSON) for 10 s, from `wrk` when it is
  installed (else httpx): requests/s, p50, p99, direct and through Serve with 1 and 2 replicas
  (each replica 1 CPU, 1 torch thread), and the CPU seconds each replica, the proxy and the
  direct server spent per request (from /proc), which is what more cores or nodes would buy;
- small: 200 sequential 16 x 20 requests: requests/s and p50, direct and through Serve (the
  proxy's hop);
- autoscale: the repo's autoscaling (min 1, max 2, target_ongoing_requests 8 here, delays
  shortened) under 48 concurrent clients: seconds until a second replica runs, and until the
  deployment is back to one after the burst;
- rolling: a new version (a changed setting) deployed while 16 retrying clients keep asking:
  requests that failed for the client (after retries), failed attempts, seconds until the new
  replicas serve alone.

`ray stop` stops every Ray process of the machine: the bench refuses to run where a Ray cluster
already runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import REPO_ROOT, serve
from bench.ray_cluster import LocalCluster, local_cluster, samples_answered, serve_config
from bench.throughput import LoadResult, find_wrk, run_httpx_load, run_wrk
from service.client import AsyncFlowClient

MODEL = "four-gaussians"
ALL_CASES = ("load", "small", "autoscale", "rolling")
JSON = "application/json"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def after_s(value: float | None) -> str:
    """Seconds for the table; None: it never happened."""
    return "never" if value is None else f"{value:.1f} s"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pids_named(prefix: str) -> list[int]:
    """Processes whose command name starts with `prefix` (Ray names its actors' processes,
    e.g. 'ray::ServeReplica', 'ray::ProxyActor')."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(prefix.encode()):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def measure_load(
    url: str,
    body: dict[str, Any],
    connections: int,
    seconds: float,
    workdir: Path,
    wrk: str | None,
    watch: dict[str, list[int]],
) -> dict[str, Any]:
    """The load, and the CPU seconds per request of each watched group of processes."""
    before = {name: sum(cpu_seconds(p) for p in pids) for name, pids in watch.items()}
    if wrk is not None:
        result = run_wrk(wrk, url, body, connections, seconds, workdir, accept=JSON)
    else:
        result = run_httpx_load(url, body, connections, seconds, accept=JSON)
    spent = {name: sum(cpu_seconds(p) for p in pids) - before[name] for name, pids in watch.items()}
    return {
        **_load_dict(result),
        "cpu_ms_per_request": {
            name: 1000 * s / max(result.ok, 1) for name, s in sorted(spent.items())
        },
    }


def _load_dict(result: LoadResult) -> dict[str, Any]:
    return {
        "generator": result.generator,
        "requests_per_s": result.rps,
        "p50_ms": 1000 * result.p50_s,
        "p99_ms": 1000 * result.p99_s,
        "ok": result.ok,
        "errors": result.errors,
    }


def sequential(url: str, body: dict[str, Any], count: int) -> dict[str, Any]:
    latencies = []
    with httpx.Client(timeout=60) as client:
        for _ in range(5):  # warm the connection and the path
            client.post(f"{url}/sample", json=body)
        start = time.perf_counter()
        for _ in range(count):
            began = time.perf_counter()
            response = client.post(f"{url}/sample", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - began)
        elapsed = time.perf_counter() - start
    return {
        "requests_per_s": count / elapsed,
        "p50_ms": 1000 * float(np.median(latencies)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
    }


def deploy(
    cluster: LocalCluster, workdir: Path, models_dir: Path, name: str, **options: Any
) -> None:
    settings = {"models_dir": str(models_dir), **options.pop("settings", {})}
    config = serve_config(http_port=cluster.http_port, settings=settings, **options)
    cluster.deploy(config, workdir / f"serve-{name}.yaml")


def case_load(ctx: Context) -> dict[str, Any]:
    body = {"model": MODEL, "num_samples": 16, "num_steps": 100}
    seconds = ctx.seconds
    out: dict[str, Any] = {"load": f"{ctx.connections} connections x 16 x 100, {seconds:g} s"}
    with serve(ctx.models_dir, "cpu", ctx.workdir / "direct.log") as direct:
        out["direct"] = measure_load(
            direct.url, body, ctx.connections, seconds, ctx.workdir, ctx.wrk,
            {"server": [direct.pid]},
        )  # fmt: skip
    for replicas in (1, 2):
        deploy(ctx.cluster, ctx.workdir, ctx.models_dir, f"load{replicas}", replicas=replicas)
        ctx.cluster.wait_replicas(replicas)
        ctx.cluster.wait_ready()
        watch = {
            "replicas": pids_named("ray::ServeReplica"),
            "proxy": pids_named("ray::ProxyActor"),
        }
        before = ctx.cluster.replica_metrics(replicas)
        result = measure_load(
            ctx.cluster.url, body, ctx.connections, seconds, ctx.workdir, ctx.wrk, watch
        )
        after = ctx.cluster.replica_metrics(replicas)
        # as each replica counted them
        result["requests_per_replica"] = sorted(
            int(samples_answered(after[pid]) - samples_answered(before[pid])) for pid in after
        )
        result["vs_direct"] = result["requests_per_s"] / out["direct"]["requests_per_s"]
        out[f"serve_{replicas}"] = result
    return out


def case_small(ctx: Context) -> dict[str, Any]:
    body = {"model": MODEL, "num_samples": 16, "num_steps": 20}
    count = ctx.small_count
    with serve(ctx.models_dir, "cpu", ctx.workdir / "direct-small.log") as direct:
        plain = sequential(direct.url, body, count)
    deploy(ctx.cluster, ctx.workdir, ctx.models_dir, "small", replicas=1)
    ctx.cluster.wait_replicas(1)
    ctx.cluster.wait_ready()
    through = sequential(ctx.cluster.url, body, count)
    through["vs_direct"] = through["requests_per_s"] / plain["requests_per_s"]
    return {"requests": f"{count} sequential 16 x 20", "direct": plain, "serve_1": through}


class Tallying(httpx.AsyncHTTPTransport):
    """Counts every HTTP attempt's answer by status, retries included."""

    def __init__(self, tally: dict[str, int]) -> None:
        super().__init__()
        self.tally = tally

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        key = f"attempt_{response.status_code}"
        self.tally[key] = self.tally.get(key, 0) + 1
        return response


async def _clients(
    url: str,
    count: int,
    until: Callable[[], bool],
    body: dict[str, Any],
    tally: dict[str, int],
) -> None:
    """`count` clients asking `body` with FlowClient's retries until `until()`; every attempt
    tallied by status, every request that failed after its retries by kind."""

    async with AsyncFlowClient(
        url, max_retries=8, max_retry_wait=2, transport=Tallying(tally)
    ) as client:

        async def one() -> None:
            while not until():
                try:
                    await client.sample(**body)
                    tally["ok"] = tally.get("ok", 0) + 1
                except Exception as exc:  # a request lost for the client
                    kind = f"failed_{type(exc).__name__}"
                    tally[kind] = tally.get(kind, 0) + 1

        await asyncio.gather(*(one() for _ in range(count)))


def case_autoscale(ctx: Context) -> dict[str, Any]:
    deploy(
        ctx.cluster, ctx.workdir, ctx.models_dir, "autoscale",
        autoscaling={
            "min_replicas": 1, "initial_replicas": 1, "max_replicas": 2,
            "target_ongoing_requests": 8, "upscale_delay_s": 2, "downscale_delay_s": 10,
            "metrics_interval_s": 0.5, "look_back_period_s": 2,
        },
    )  # fmt: skip
    ctx.cluster.wait_replicas(1)
    ctx.cluster.wait_ready()
    tally: dict[str, int] = {}
    marks: dict[str, float] = {}
    start = time.monotonic()

    def watch() -> None:
        while "up" not in marks and time.monotonic() - start < 120:
            if ctx.cluster.replicas().get("RUNNING", 0) == 2:
                marks["up"] = time.monotonic() - start
            time.sleep(0.5)

    async def burst() -> None:
        watcher = asyncio.create_task(asyncio.to_thread(watch))
        body = {"model": MODEL, "num_samples": 64, "num_steps": 200}
        await _clients(
            ctx.cluster.url,
            48,
            lambda: "up" in marks or time.monotonic() - start > 120,
            body,
            tally,
        )
        await watcher

    asyncio.run(burst())
    ended = time.monotonic()
    ctx.cluster.wait_replicas(1, timeout=180)
    return {
        "clients": "48 x (64 x 200), FlowClient with retries",
        "seconds_to_second_replica": marks.get("up"),
        "seconds_back_to_one_after_burst": time.monotonic() - ended,
        "downscale_delay_s": 10,
        "tally": tally,
    }


def case_rolling(ctx: Context) -> dict[str, Any]:
    deploy(ctx.cluster, ctx.workdir, ctx.models_dir, "rolling-a", replicas=2)
    ctx.cluster.wait_replicas(2)
    ctx.cluster.wait_ready()
    old = set(_fronts(ctx.cluster.url, 2))
    tally: dict[str, int] = {}
    marks: dict[str, float] = {}
    start = time.monotonic()

    def roll() -> None:
        time.sleep(2)
        marks["deploy"] = time.monotonic() - start
        # A new version: any change of the app's args or the deployment's options.
        deploy(
            ctx.cluster, ctx.workdir, ctx.models_dir, "rolling-b", replicas=2,
            settings={"warmup_passes": 2},
        )  # fmt: skip
        time.sleep(1)
        ctx.cluster.wait_replicas(2, timeout=240)
        marks["done"] = time.monotonic() - start

    async def load() -> None:
        rolling = asyncio.create_task(asyncio.to_thread(roll))
        body = {"model": MODEL, "num_samples": 16, "num_steps": 100}
        await _clients(ctx.cluster.url, 16, lambda: "done" in marks, body, tally)
        await rolling

    asyncio.run(load())
    new = set(_fronts(ctx.cluster.url, 2))
    return {
        "clients": "16 x (16 x 100), FlowClient with retries",
        "seconds_to_roll": marks["done"] - marks["deploy"],
        "old_replicas_left": len(old & new),
        "tally": tally,
    }


def _fronts(url: str, replicas: int, within_s: float = 60) -> list[str]:
    seen: set[str] = set()
    deadline = time.monotonic() + within_s
    while len(seen) < replicas and time.monotonic() < deadline:
        seen.add(httpx.get(f"{url}/readyz", timeout=10).headers["X-Flow-Front"])
        time.sleep(0.05)
    return sorted(seen)


class Context:
    def __init__(self, cluster: LocalCluster, workdir: Path, quick: bool) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.models_dir = workdir / "models"
        shutil.copytree(REPO_ROOT / "models" / MODEL, self.models_dir / MODEL)
        self.wrk = find_wrk()
        self.connections = 16 if quick else 64
        self.seconds = 2.0 if quick else 10.0
        self.small_count = 20 if quick else 200


CASES: dict[str, Callable[[Context], dict[str, Any]]] = {
    "load": case_load,
    "small": case_small,
    "autoscale": case_autoscale,
    "rolling": case_rolling,
}


def table(results: dict[str, Any]) -> str:
    lines = []
    if "load" in results:
        load = results["load"]
        lines.append(f"load ({load['load']}):")
        for key in ("direct", "serve_1", "serve_2"):
            r = load[key]
            ratio = f"  {r['vs_direct']:.2f}x direct" if "vs_direct" in r else ""
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_request"].items())
            split = f"  per replica {r['requests_per_replica']}" if key != "direct" else ""
            lines.append(
                f"  {key:8s} {r['requests_per_s']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
                f"p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}{ratio}  CPU ms/request: {cpu}"
                f"{split}"
            )
    if "small" in results:
        small = results["small"]
        lines.append(f"small ({small['requests']}):")
        for key in ("direct", "serve_1"):
            r = small[key]
            ratio = f"  {r['vs_direct']:.2f}x direct" if "vs_direct" in r else ""
            lines.append(
                f"  {key:8s} {r['requests_per_s']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
                f"p99 {r['p99_ms']:6.1f} ms{ratio}"
            )
    if "autoscale" in results:
        a = results["autoscale"]
        up, down = a["seconds_to_second_replica"], a["seconds_back_to_one_after_burst"]
        lines.append(
            f"autoscale ({a['clients']}): second replica after {after_s(up)}, back to one "
            f"{after_s(down)} after the burst (downscale_delay_s {a['downscale_delay_s']}); "
            f"{a['tally']}"
        )
    if "rolling" in results:
        r = results["rolling"]
        lines.append(
            f"rolling ({r['clients']}): new version serving alone after "
            f"{r['seconds_to_roll']:.1f} s, old replicas left {r['old_replicas_left']}; "
            f"{r['tally']}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ray", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short loads (a smoke run)")
    parser.add_argument("--cases", default=",".join(ALL_CASES), help="comma-separated cases")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument(
        "--ray-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of Ray's processes, e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        print(f"bench.ray: error: unknown case(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="flowserve-bench-ray-") as tmp:
        workdir = Path(tmp)
        env = dict(item.split("=", 1) for item in args.ray_env)
        with local_cluster(workdir / "ray", nodes=2, cpus_per_node=2, env=env) as cluster:
            ctx = Context(cluster, workdir, args.quick)
            for case in cases:
                print(f"bench.ray: {case} ...", flush=True)
                results[case] = CASES[case](ctx)
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nbench.ray: results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
