"""Soak: many mixed requests from many clients against a real `python -m service`.

    python -m bench.soak [--requests 10000] [--clients 32] [--seed 0] [--fault]

Starts a server on a free loopback port over a post-style network written here (random weights,
dim 2), then:

1. asks every deterministic request of a fixed pool once, one at a time (the idle answers), and
   checks the pool's x0 requests against an Euler loop run here on the same TorchScript file;
2. sends `--requests` requests drawn from the pool, mixed with GETs and invalid requests, from
   `--clients` concurrent clients: /sample (JSON and .npy), /trajectory, /encode, /log_prob
   (exact and seeded Hutchinson), /models, /healthz, /readyz, /metrics;
3. checks: no 5xx; every invalid request gets its 4xx; every deterministic answer equals its idle
   answer; resident memory (VmRSS) at the end within 5% of its value after the warm-up (the
   first tenth of the requests).

With `--fault`, the served network raises a device error (a CUDA error's message, which the
engine treats as sticky) on any row that holds the marker 12345, and one such request is sent
when half of the storm has gone: the engine dies, its waiting requests are refused, the watchdog
replaces it. Then every request must have been answered correctly or refused with a contract
status (503 from the dead engine, /readyz 503 while it recovers), none may have waited past its
own deadline (`timeout_s` 30 s), exactly one engine fault and one restart must be counted, and
afterwards the service must be ready and answer the pool as it did before.

Prints the figures and exits 1 when a check fails. Loopback only; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.common import MB, rss_bytes, serve, write_post_model

DIM = 2
MODEL = "soak"
MAX_RSS_GROWTH = 0.05
FAULT_MARKER = 12345.0
TIMEOUT_S = 30.0
"""The deadline of every pooled request in --fault runs: none may be answered later."""


class Faulty(torch.nn.Module):
    """`inner`, except that a row holding FAULT_MARKER raises what a broken GPU would."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if bool((x == 12345.0).any()):
            raise RuntimeError("CUDA error: an illegal memory access (injected by bench.soak)")
        return self.inner(t, x)


def make_faulty(folder: Path) -> None:
    """Wrap the network of `folder` in `Faulty`, in place (model.pt and its digest)."""
    inner = torch.jit.load(str(folder / "model.pt"))
    torch.jit.save(torch.jit.script(Faulty(inner)), str(folder / "model.pt"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"] = hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def euler(module, x0: torch.Tensor, num_steps: int) -> torch.Tensor:
    """x[k+1] = x[k] + (1/K) v(k/K, x[k]), written apart from the service."""
    x = x0.clone()
    with torch.no_grad():
        for k in range(num_steps):
            x = x + (1.0 / num_steps) * module(torch.full((x.shape[0], 1), k / num_steps), x)
    return x


@dataclass(frozen=True)
class Call:
    """One request. expect: the status it must get; key: set when its answer is deterministic."""

    method: str
    path: str
    body: dict | None = None
    raw: bytes | None = None
    npy: bool = False
    expect: int = 200
    key: str | None = None
    may_refuse: bool = False
    """True in --fault runs for requests that may meet the dead engine (503) or its recovery."""

    def allowed(self, status: int) -> bool:
        return status == self.expect or (self.may_refuse and status == 503)


def points(rng: random.Random, rows: int) -> list[list[float]]:
    return [[round(rng.uniform(-3, 3), 3) for _ in range(DIM)] for _ in range(rows)]


def deterministic_pool(rng: random.Random, size: int, fault: bool = False) -> list[Call]:
    """Requests whose answers depend only on the request: seeded, or given their points.
    With `fault`, each carries a deadline and may be refused with 503."""
    pool = []
    for i in range(size):
        kind = i % 6
        steps = rng.randint(1, 20)
        solver = rng.choice(["euler", "euler", "midpoint", "heun", "rk4"])
        rows = rng.randint(1, 32)
        if kind == 0:
            body = {"num_samples": rows, "num_steps": steps, "seed": i, "solver": solver}
            call = ("/sample", body, False)
        elif kind == 1:
            body = {"num_samples": rows, "num_steps": steps, "seed": i, "solver": solver}
            call = ("/sample", body, True)
        elif kind == 2:
            body = {"x0": points(rng, rows), "num_steps": steps, "solver": "euler"}
            call = ("/sample", body, False)
        elif kind == 3:
            stride = rng.randint(1, steps)
            body = {"num_samples": rows, "num_steps": steps, "seed": i, "stride": stride}
            call = ("/trajectory", body, rng.random() < 0.5)
        elif kind == 4:
            call = (
                "/encode",
                {"x": points(rng, rows), "num_steps": steps, "solver": solver},
                False,
            )
        else:
            body = {"x": points(rng, min(rows, 8)), "num_steps": min(steps, 8)}
            if rng.random() < 0.5:
                body |= {"divergence": "hutchinson", "num_probes": rng.randint(1, 4), "seed": i}
            call = ("/log_prob", body, False)
        path, body, npy = call
        if fault:
            body = {**body, "timeout_s": TIMEOUT_S}
        key = json.dumps([path, body, npy], sort_keys=True)
        pool.append(Call("POST", path, body, npy=npy, key=key, may_refuse=fault))
    return pool


INVALID = [
    Call("POST", "/sample", {"num_samples": 4, "num_steps": 0}, expect=422),
    Call("POST", "/sample", {"model": "absent", "num_samples": 4}, expect=404),
    Call("POST", "/sample", {"x0": [[1.0, 2.0, 3.0]], "num_steps": 4}, expect=422),
    Call("POST", "/sample", {"num_samples": 10**9, "num_steps": 4}, expect=413),
    Call("POST", "/trajectory", {"num_samples": 2, "num_steps": 2, "stride": 5}, expect=422),
    Call("POST", "/encode", {"x": [], "num_steps": 4}, expect=422),
    Call("POST", "/log_prob", {"x": [[1.0, 2.0]], "num_probes": 2}, expect=422),
    Call("POST", "/sample", raw=b'{"num_samples": 4', expect=422),
    Call("POST", "/sample", raw=b"\x80\x81", expect=422),
    Call("GET", "/models/absent", expect=404),
]
GETS = [Call("GET", p) for p in ("/models", f"/models/{MODEL}", "/healthz", "/readyz", "/metrics")]


def draw_calls(rng: random.Random, pool: list[Call], count: int, fault: bool = False) -> list[Call]:
    calls = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.08:
            calls.append(rng.choice(INVALID))
        elif roll < 0.16:
            get = rng.choice(GETS)
            # While a replaced engine recovers, /readyz says so: 503.
            refuse = fault and get.path == "/readyz"
            calls.append(Call("GET", get.path, may_refuse=refuse))
        elif roll < 0.24:  # unseeded: checked only for its status and shape
            body = {"num_samples": rng.randint(1, 16)}
            calls.append(Call("POST", "/sample", body, may_refuse=fault))
        else:
            calls.append(rng.choice(pool))
    if fault:  # the fault, half way
        marker = Call("POST", "/sample", {"x0": [[FAULT_MARKER, 0.0]], "num_steps": 2}, expect=503)
        calls.insert(count // 2, marker)
    return calls


def decode(call: Call, response: httpx.Response) -> dict[str, np.ndarray]:
    """The numbers of an answer, by name."""
    if call.npy:
        return {"array": np.load(io.BytesIO(response.content))}
    answer = response.json()
    names = ("samples", "trajectory", "latents", "log_prob", "log_p0", "divergence_integral")
    return {k: np.asarray(answer[k], dtype=np.float64) for k in names if k in answer}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    # Passes batch rows of several requests together, so the last float32 bits may differ.
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and np.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a
    )


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    wrong_status: list[str] = field(default_factory=list)
    wrong_numbers: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    late: list[str] = field(default_factory=list)
    checked: int = 0


def request_args(call: Call) -> dict:
    headers = {"Accept": "application/x-npy"} if call.npy else {}
    if call.raw is not None:
        headers["Content-Type"] = "application/json"
        return {"method": call.method, "url": call.path, "content": call.raw, "headers": headers}
    return {"method": call.method, "url": call.path, "json": call.body, "headers": headers}


async def storm(url: str, calls: list[Call], clients: int, idle: dict, tally: Tally) -> None:
    queue = iter(calls)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(client: httpx.AsyncClient) -> None:
        for call in queue:  # the shared iterator hands each call to one worker
            start = time.perf_counter()
            try:
                response = await client.request(**request_args(call))
            except httpx.TransportError as exc:
                tally.transport_errors.append(f"{call.path}: {exc!r}")
                continue
            took = time.perf_counter() - start
            tally.latencies.append(took)
            tally.statuses[response.status_code] += 1
            deadline = (call.body or {}).get("timeout_s")
            if deadline is not None and took > deadline + 1.0:
                tally.late.append(f"{call.path} took {took:.1f} s, deadline {deadline:g} s")
            if not call.allowed(response.status_code):
                tally.wrong_status.append(
                    f"{call.path} {response.status_code} {response.text[:200]}"
                )
            elif call.key is not None and response.status_code == 200:
                tally.checked += 1
                if not same(decode(call, response), idle[call.key]):
                    tally.wrong_numbers.append(call.key[:200])

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--pool", type=int, default=240, help="distinct deterministic requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fault", action="store_true", help="kill the engine half way; check it recovers"
    )
    parser.add_argument("--keep-log", type=Path, help="copy the server's log here at the end")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    pool = deterministic_pool(rng, args.pool, args.fault)
    calls = draw_calls(rng, pool, args.requests, args.fault)
    warmup = max(1, args.requests // 10)
    failures: list[str] = []

    with tempfile.TemporaryDirectory(prefix="flowserve-soak-") as tmp:
        root = Path(tmp)
        write_post_model(root / "models", MODEL, dim=DIM)
        module = torch.jit.load(str(root / "models" / MODEL / "model.pt")).eval()
        env = {}
        if args.fault:
            make_faulty(root / "models" / MODEL)
            env = {"FLOW_WATCHDOG_INTERVAL_S": "0.1", "FLOW_LOG_LEVEL": "info"}
        with serve(root / "models", "cpu", root / "server.log", env=env) as server:
            url = server.url
            started = time.perf_counter()
            idle: dict[str, dict[str, np.ndarray]] = {}
            with httpx.Client(base_url=url, timeout=120) as client:
                for call in pool:
                    response = client.request(**request_args(call))
                    if response.status_code != 200:
                        failures.append(f"idle {call.key}: {response.status_code}")
                        continue
                    idle[call.key] = decode(call, response)
                    if call.body.get("x0") is not None:
                        x0 = torch.tensor(call.body["x0"])
                        expected = euler(module, x0, call.body["num_steps"]).numpy()
                        if not np.allclose(idle[call.key]["samples"], expected, atol=1e-5):
                            failures.append(f"idle answer differs from Euler: {call.key[:120]}")
            idle_s = time.perf_counter() - started

            tally = Tally()
            started = time.perf_counter()
            asyncio.run(storm(url, calls[:warmup], args.clients, idle, tally))
            rss_warm = rss_bytes(server.pid)["VmRSS"]
            asyncio.run(storm(url, calls[warmup:], args.clients, idle, tally))
            storm_s = time.perf_counter() - started
            rss_end = rss_bytes(server.pid)["VmRSS"]
            alive = httpx.get(f"{url}/healthz").status_code == 200
            recovered = None
            if args.fault:
                recovered = recovery(url, pool, idle, failures)
            log_tail = (root / "server.log").read_text()[-3000:]
            if args.keep_log:
                args.keep_log.write_text((root / "server.log").read_text())

    refused = tally.statuses.get(503, 0)
    server_errors = sum(n for status, n in tally.statuses.items() if status >= 500)
    if args.fault:  # the dead engine's 503s are contract answers; anything else 5xx is not
        server_errors -= refused
    growth = (rss_end - rss_warm) / rss_warm
    latencies = sorted(tally.latencies)
    print(f"requests            {len(latencies)} from {args.clients} clients in {storm_s:.1f} s")
    print(f"throughput          {len(latencies) / storm_s:.0f} requests/s")
    print(
        f"latency p50 / p99   {1000 * statistics.median(latencies):.1f} ms / "
        f"{1000 * latencies[int(0.99 * (len(latencies) - 1))]:.1f} ms"
    )
    print(f"statuses            {dict(sorted(tally.statuses.items()))}")
    print(f"5xx                 {server_errors}")
    print(f"wrong status        {len(tally.wrong_status)}")
    print(f"transport errors    {len(tally.transport_errors)}")
    print(
        f"seeded answers      {tally.checked} checked against {len(idle)} idle answers "
        f"({idle_s:.1f} s), {len(tally.wrong_numbers)} differ"
    )
    print(
        f"VmRSS               {rss_warm / MB:.1f} MiB after warm-up ({warmup} requests), "
        f"{rss_end / MB:.1f} MiB at the end: {100 * growth:+.2f}% (limit "
        f"{100 * MAX_RSS_GROWTH:.0f}%)"
    )
    print(f"server alive        {alive}")
    print(f"past their deadline {len(tally.late)}")
    if recovered is not None:
        print(f"fault               {refused} requests refused (503); {recovered}")

    failures += tally.wrong_status[:5] + tally.wrong_numbers[:5]
    if server_errors:
        failures.append(f"{server_errors} answers were 5xx")
    if tally.transport_errors:
        failures += tally.transport_errors[:5]
        failures.append(f"{len(tally.transport_errors)} requests got no answer")
    if tally.wrong_status:
        failures.append(f"{len(tally.wrong_status)} answers had the wrong status")
    if tally.wrong_numbers:
        failures.append(f"{len(tally.wrong_numbers)} seeded answers differ from the idle ones")
    if growth > MAX_RSS_GROWTH:
        failures.append(f"resident memory grew {100 * growth:.2f}% after warm-up")
    if not alive:
        failures.append("the server stopped answering")
    if tally.late:
        failures += tally.late[:5]
        failures.append(f"{len(tally.late)} requests were answered past their deadline")
    for failure in failures:
        print(f"FAIL {failure}")
    if failures:
        print(f"server log (tail):\n{log_tail}")
    print("soak: " + ("FAILED" if failures else "ok"))
    return 1 if failures else 0


def recovery(
    url: str, pool: list[Call], idle: dict[str, dict[str, np.ndarray]], failures: list[str]
) -> str:
    """After a --fault storm: the service is ready again within 10 s, answers the pool as it did
    before the fault, and counted one engine fault and one restart."""
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/readyz").status_code != 200:
        if time.monotonic() > deadline:
            failures.append("not ready 10 s after the storm")
            return "not ready again"
        time.sleep(0.1)
    wrong = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for call in pool[:40]:
            response = client.request(**request_args(call))
            if response.status_code != 200 or not same(decode(call, response), idle[call.key]):
                wrong += 1
        text = client.get("/metrics").text
    faults = _metric(text, "flowserve_engine_faults_total")
    restarts = _metric(text, "flowserve_engine_restarts_total")
    if wrong:
        failures.append(f"{wrong} of 40 pool requests differ after the recovery")
    if (faults, restarts) != (1.0, 1.0):
        failures.append(f"counted {faults:g} engine faults and {restarts:g} restarts, not 1 and 1")
    return (
        f"ready again, 40 pool answers as before the fault ({wrong} differ); "
        f"engine faults {faults:g}, restarts {restarts:g}"
    )


def _metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


if __name__ == "__main__":
    sys.exit(main())
