"""flowserve on Ray Serve: a real Ray cluster of two nodes on this machine (`ray start --head` and
`ray start --address`, loopback), deployed with `serve deploy` from deploy/ray/serve.yaml, and
real HTTP through Serve's proxy.

One cluster serves the whole module; the tests run in file order, the last ones redeploying."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, free_port, running_server, service_command

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install flowserve[ray])")

from bench.ray_cluster import (
    APP,
    SERVE_CONFIG,
    LocalCluster,
    RayClusterBusy,
    local_cluster,
    metric_total,
    samples_answered,
    serve_config,
)
from service.client import AsyncFlowClient, FlowClient

pytestmark = pytest.mark.e2e

MODEL = "four-gaussians"
SETTINGS = {"warmup_passes": 1}
"""Over the repo config's settings in every deployment here (faster replica starts)."""


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled four-gaussians and digits (a flat model and a conditional image model)."""
    root = tmp_path_factory.mktemp("ray-models")
    for name in (MODEL, "digits"):
        shutil.copytree(REPO_ROOT / "models" / name, root / name)
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LocalCluster]:
    workdir = tmp_path_factory.mktemp("ray")
    try:
        with local_cluster(workdir, nodes=2, cpus_per_node=2) as running:
            config = serve_config(
                http_port=running.http_port,
                settings={**SETTINGS, "models_dir": str(models_dir)},
                replicas=2,
            )
            running.deploy(config, workdir / "serve.yaml")
            running.wait_replicas(2)
            running.wait_ready()
            yield running
    except RayClusterBusy as exc:
        pytest.skip(str(exc))


def test_the_kuberay_manifest_holds_the_serve_config() -> None:
    documents = yaml.safe_load_all((REPO_ROOT / "deploy" / "ray" / "rayservice.yaml").read_text())
    manifest, policy = documents
    assert (manifest["kind"], policy["kind"]) == ("RayService", "NetworkPolicy")
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load(SERVE_CONFIG.read_text())


REQUESTS = [
    ("/sample", {"model": MODEL, "num_samples": 64, "num_steps": 20, "seed": 3}),
    ("/sample", {"model": MODEL, "num_samples": 16, "num_steps": 8, "solver": "rk4", "seed": 4}),
    ("/sample", {"model": "digits", "num_samples": 2, "num_steps": 8, "labels": [1, 7], "seed": 5}),
    ("/trajectory", {"model": MODEL, "num_samples": 8, "num_steps": 10, "stride": 5, "seed": 6}),
    ("/encode", {"model": MODEL, "x": [[4.0, 4.0], [-4.0, 4.1]], "num_steps": 10}),
    ("/log_prob", {"model": MODEL, "x": [[4.0, 4.0], [-4.0, 4.1]], "num_steps": 10}),
]


def test_answers_through_serve_equal_python_m_service(
    cluster: LocalCluster, models_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {"FLOW_WARMUP_PASSES": "1", "FLOW_DEFAULT_MODEL": MODEL, "FLOW_TORCH_THREADS": "1"}
    with running_server(
        service_command(models_dir, port), port, tmp_path / "direct.log", env=env
    ) as direct:
        for path, body in REQUESTS:
            for accept in ("application/json", "application/x-npy"):
                answers = [
                    httpx.post(f"{url}{path}", json=body, headers={"Accept": accept}, timeout=60)
                    for url in (direct, cluster.url)
                ]
                kind = "application/json" if path == "/log_prob" else accept  # JSON only
                for answer in answers:
                    assert answer.status_code == 200, (path, accept, answer.text)
                    assert answer.headers["content-type"].startswith(kind)
                if kind == "application/x-npy":
                    plain, served = (np.load(io.BytesIO(r.content)) for r in answers)
                    assert plain.shape == served.shape and plain.size > 0
                    np.testing.assert_allclose(served, plain, atol=1e-5, rtol=0)
                else:
                    assert_close(answers[1].json(), answers[0].json())


def assert_close(served: object, plain: object) -> None:
    """Equal JSON answers: numbers within the batched-vs-solo tolerance, the rest exactly."""
    if isinstance(plain, dict):
        assert isinstance(served, dict) and served.keys() == plain.keys()
        for key in plain:
            assert_close(served[key], plain[key])
    elif isinstance(plain, list) and plain and not isinstance(plain[0], str):
        np.testing.assert_allclose(np.asarray(served), np.asarray(plain), atol=1e-5, rtol=0)
    else:
        assert served == plain


def test_errors_through_serve_keep_the_contracts_shape(cluster: LocalCluster) -> None:
    bad = httpx.post(f"{cluster.url}/sample", json={"model": MODEL, "num_samples": 0})
    assert bad.status_code == 422
    assert bad.json()["detail"].startswith("num_samples:")
    unknown = httpx.post(f"{cluster.url}/sample", json={"model": "nope", "num_samples": 1})
    assert unknown.status_code == 404
    assert unknown.json()["detail"].startswith("model: unknown model 'nope'")


def test_both_replicas_take_traffic_and_count_it(cluster: LocalCluster) -> None:
    before = cluster.replica_metrics(2)
    sent = 256

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as http:
            body = {"model": MODEL, "num_samples": 16, "num_steps": 50}
            return await asyncio.gather(*(http.post("/sample", json=body) for _ in range(sent)))

    answers = asyncio.run(burst())
    assert Counter(r.status_code for r in answers) == {200: sent}
    after = cluster.replica_metrics(2)
    assert after.keys() == before.keys()
    counted = {
        front: samples_answered(after[front]) - samples_answered(before[front]) for front in after
    }
    assert sum(counted.values()) == sent, counted
    assert min(counted.values()) > 0, counted  # both replicas served some
    fronts = Counter(r.headers["X-Flow-Front"] for r in answers)
    assert fronts == Counter({front: n for front, n in counted.items() if n}), (fronts, counted)


def test_a_client_that_goes_away_cancels_its_work_in_the_replica(cluster: LocalCluster) -> None:
    before = cluster.replica_metrics(2)
    body = {"model": MODEL, "num_samples": 4096, "num_steps": 10_000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{cluster.url}/sample", json=body, timeout=1.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = cluster.replica_metrics(2)
        dropped = sum(
            metric_total(after[f], "flowserve_rows_dropped_total", reason="disconnect")
            - metric_total(before[f], "flowserve_rows_dropped_total", reason="disconnect")
            for f in after
        )
        if dropped == 4096:
            break
        time.sleep(0.5)
    assert dropped == 4096


class Recording(httpx.AsyncHTTPTransport):
    """Every HTTP attempt's answer, retries included."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: list[tuple[int, str, str | None]] = []
        self.attempts = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.attempts += 1
        if response.status_code != 200:
            await response.aread()
            detail = json.loads(response.content)["detail"]  # JSON, or this fails the test
            self.failed.append((response.status_code, detail, response.headers.get("Retry-After")))
        return response


def test_a_replica_killed_under_load_loses_no_request_of_a_retrying_client(
    cluster: LocalCluster,
) -> None:
    fronts = set(cluster.replica_metrics(2))
    victim = int(sorted(fronts)[0])
    transport = Recording()
    done: list[int] = []
    stop_at = time.monotonic() + 12

    async def load() -> None:
        async with AsyncFlowClient(
            cluster.url, transport=transport, max_retries=8, max_retry_wait=2
        ) as client:

            async def loop(worker: int) -> None:
                seed = worker * 10_000
                while time.monotonic() < stop_at:
                    samples = await client.sample(
                        model=MODEL, num_samples=16, num_steps=100, seed=seed
                    )
                    assert samples.shape == (16, 2)
                    done.append(seed)
                    seed += 1

            async def kill() -> None:
                await asyncio.sleep(3)
                os.kill(victim, signal.SIGKILL)

            await asyncio.gather(kill(), *(loop(w) for w in range(16)))

    asyncio.run(load())
    assert len(done) > 100  # the loop ran; every request it made came back with samples
    assert all(status == 503 and after for status, _, after in transport.failed), transport.failed
    cluster.wait_replicas(2)  # Serve started a replacement
    replacement = set(cluster.replica_metrics(2)) - fronts
    assert len(replacement) == 1  # a new process answers
    assert cluster.app_status().get("status") == "RUNNING"


def test_a_replica_with_no_models_or_a_tampered_model_never_becomes_healthy(
    cluster: LocalCluster, models_dir: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    tampered = tmp_path / "tampered"
    shutil.copytree(models_dir / MODEL, tampered / MODEL)
    with (tampered / MODEL / "model.pt").open("ab") as file:
        file.write(b"\0")
    config = serve_config(
        http_port=cluster.http_port,
        settings={**SETTINGS, "models_dir": str(models_dir)},
        replicas=2,
    )
    for name, folder in (("empty", empty), ("tampered", tampered)):
        broken = json.loads(json.dumps(config["applications"][0]))
        broken.update(name=name, route_prefix=f"/{name}")
        broken["args"] = {**broken["args"], "models_dir": str(folder)}
        options = broken["deployments"][0]
        options.update(num_replicas=1, max_constructor_retry_count=2)
        config["applications"].append(broken)
    cluster.deploy(config, tmp_path / "serve.yaml")
    deadline = time.monotonic() + 180
    states = {}
    while time.monotonic() < deadline:
        states = {name: cluster.app_status(name) for name in ("empty", "tampered")}
        if all(s.get("status") == "DEPLOY_FAILED" for s in states.values()):
            break
        for name in states:
            assert cluster.replicas(name).get("RUNNING", 0) == 0, (name, states[name])
        time.sleep(1)
    assert {n: s.get("status") for n, s in states.items()} == {
        "empty": "DEPLOY_FAILED",
        "tampered": "DEPLOY_FAILED",
    }
    assert "holds no model folder" in json.dumps(states["empty"])
    assert f"model {MODEL} was refused" in json.dumps(states["tampered"])
    assert cluster.app_status(APP).get("status") == "RUNNING"  # the good app serves on


def test_autoscaling_adds_a_replica_under_a_burst_and_removes_it_after(
    cluster: LocalCluster, models_dir: Path, tmp_path: Path
) -> None:
    config = serve_config(
        http_port=cluster.http_port,
        settings={**SETTINGS, "models_dir": str(models_dir), "api_key": "k-ray"},
        autoscaling={
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 8,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        },
    )
    cluster.deploy(config, tmp_path / "serve.yaml")
    cluster.wait_replicas(1)
    # The key guards the routes through the proxy.
    refused = httpx.post(f"{cluster.url}/sample", json={"model": MODEL})
    assert refused.status_code == 401 and "detail" in refused.json()
    scaled: list[dict[str, int]] = []
    stop_at = time.monotonic() + 60

    async def burst() -> None:
        async with AsyncFlowClient(cluster.url, api_key="k-ray", max_retries=8) as client:

            async def loop() -> None:
                while time.monotonic() < stop_at and not scaled:
                    await client.sample(model=MODEL, num_samples=64, num_steps=200)

            async def watch() -> None:
                while time.monotonic() < stop_at and not scaled:
                    states = await asyncio.to_thread(cluster.replicas)
                    if states.get("RUNNING", 0) == 2:
                        scaled.append(states)
                    await asyncio.sleep(0.5)

            await asyncio.gather(watch(), *(loop() for _ in range(48)))

    asyncio.run(burst())
    assert scaled, "no second replica under 48 concurrent clients"
    cluster.wait_replicas(1, timeout=90)  # and back to one once the burst is over
    with FlowClient(cluster.url, api_key="k-ray") as client:
        assert client.sample(model=MODEL, num_samples=3, num_steps=4).shape == (3, 2)
