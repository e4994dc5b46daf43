"""A Ray cluster of several nodes on this machine, started with Ray's own CLI as the README shows
(`ray start --head`, then `ray start --address` per extra node), and flowserve deployed on it
with `serve deploy` from the repo's Serve config: what the Ray Serve tests and bench.ray use.

`ray stop` stops every Ray process of this machine, so `local_cluster` refuses to start where a
Ray cluster already runs (`RayClusterBusy`), rather than stop someone else's.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.common import REPO_ROOT, free_port

SERVE_CONFIG = REPO_ROOT / "deploy" / "ray" / "serve.yaml"
APP = "flowserve"
DEPLOYMENT = "FlowService"
PROXY_ENV = {
    # The proxies keep the service's error shape (service.ray_serve.proxy_middlewares).
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "service.ray_serve:proxy_middlewares",
    # Every proxy spreads requests over all replicas, not its own node's first.
    "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
}


def metric_total(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus text's samples `name` whose labels include `labels`."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def samples_answered(text: str) -> float:
    """The /sample requests a replica answered 200, from its /metrics text."""
    return metric_total(text, "flowserve_requests_total", endpoint="/sample", status="200")


class RayClusterBusy(RuntimeError):
    """A Ray cluster already runs on this machine."""


def ray_command(name: str = "ray") -> str:
    """`ray` or `serve` next to this interpreter (a venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def ray_running() -> bool:
    """True when a raylet of any cluster runs on this machine."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "raylet":
                    return True
    return False


@dataclass
class LocalCluster:
    address: str  # the GCS, host:port
    dashboard: str  # http://host:port, for serve deploy / serve status
    http_port: int  # the Serve proxy's
    env: dict[str, str]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def serve(self, *args: str, timeout: float = 120) -> str:
        """Run `serve <args>` against this cluster; its output, or RuntimeError with it."""
        result = subprocess.run(
            [ray_command("serve"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
        )
        if result.returncode != 0:
            raise RuntimeError(f"serve {args[0]} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def deploy(self, config: dict[str, Any], path: Path) -> None:
        """`serve deploy` of `config`, written to `path`."""
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.serve("deploy", "--address", self.dashboard, str(path))

    def status(self) -> dict[str, Any]:
        """`serve status`, parsed."""
        return yaml.safe_load(self.serve("status", "--address", self.dashboard))

    def replicas(self, app: str = APP) -> dict[str, int]:
        """Replica states of the app's deployment, e.g. {"RUNNING": 2}."""
        apps = self.status().get("applications") or {}
        deployment = (apps.get(app) or {}).get("deployments", {}).get(DEPLOYMENT) or {}
        return deployment.get("replica_states") or {}

    def app_status(self, app: str = APP) -> dict[str, Any]:
        return (self.status().get("applications") or {}).get(app) or {}

    def wait_replicas(self, running: int, timeout: float = 180, app: str = APP) -> None:
        """Until exactly `running` replicas run and no other is starting or stopping."""
        deadline = time.monotonic() + timeout
        states: dict[str, int] = {}
        while time.monotonic() < deadline:
            states = self.replicas(app)
            if states == {"RUNNING": running}:
                return
            time.sleep(0.5)
        raise TimeoutError(f"replicas of {app}: {states} after {timeout:.0f} s, not {running}")

    def replica_metrics(self, replicas: int, within_s: float = 60) -> dict[str, str]:
        """/metrics of every replica, by the pid that answered (`X-Flow-Front`), asked through
        the proxy until each of `replicas` has answered. (Serve's router remembers each
        replica's queue length for a few seconds: right after a burst it may keep choosing the
        one it saw idle last.)"""
        seen: dict[str, str] = {}
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            response = httpx.get(f"{self.url}/metrics", timeout=10)
            response.raise_for_status()
            seen[response.headers["X-Flow-Front"]] = response.text
            if len(seen) == replicas:
                return seen
            time.sleep(0.05)
        raise TimeoutError(f"only {len(seen)} of {replicas} replicas answered /metrics")

    def wait_ready(self, timeout: float = 180) -> None:
        """Until /readyz through the proxy answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"{self.url}/readyz not 200 after {timeout:.0f} s")


def serve_config(
    *,
    http_port: int,
    settings: dict[str, Any] | None = None,
    replicas: int | None = None,
    autoscaling: dict[str, Any] | None = None,
    deployment: dict[str, Any] | None = None,
    proxy_location: str = "HeadOnly",
) -> dict[str, Any]:
    """The repo's Serve config with what a single-machine cluster needs changed: the proxy's port,
    one proxy (every node of this cluster is the same machine, so one proxy per node would
    fight over the port), and optionally settings (`args`), a fixed replica count, autoscaling
    or other deployment options."""
    config = copy.deepcopy(yaml.safe_load(SERVE_CONFIG.read_text()))
    config["proxy_location"] = proxy_location
    config["http_options"] = {**config["http_options"], "host": "127.0.0.1", "port": http_port}
    app = config["applications"][0]
    app["args"] = {**app.get("args", {}), **(settings or {})}
    options = app["deployments"][0]
    if replicas is not None:
        options.pop("autoscaling_config", None)
        options["num_replicas"] = replicas
    if autoscaling is not None:
        options["autoscaling_config"] = {**options.get("autoscaling_config", {}), **autoscaling}
    options.update(deployment or {})
    return config


@contextlib.contextmanager
def local_cluster(
    workdir: Path, *, nodes: int = 2, cpus_per_node: int = 2, env: dict[str, str] | None = None
) -> Iterator[LocalCluster]:
    """`nodes` Ray nodes on this machine, on loopback, until the block ends (then `ray stop`)."""
    if ray_running():
        raise RayClusterBusy("a Ray cluster already runs on this machine; stop it first")
    gcs_port, dashboard_port, http_port = free_port(), free_port(), free_port()
    full_env = {
        **os.environ,
        **PROXY_ENV,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
        **(env or {}),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "ray-start.log"
    cluster = LocalCluster(
        address=f"127.0.0.1:{gcs_port}",
        dashboard=f"http://127.0.0.1:{dashboard_port}",
        http_port=http_port,
        env=full_env,
        log=log,
    )
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node)]
    head = [
        "start",
        "--head",
        "--port",
        str(gcs_port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard_port),
        "--disable-usage-stats",
    ]
    try:
        with log.open("a") as out:
            _run([ray_command(), *head, *common], full_env, out)
            for _ in range(nodes - 1):
                _run([ray_command(), "start", "--address", cluster.address, *common], full_env, out)
        yield cluster
    finally:
        with log.open("a") as out:
            subprocess.run(
                [ray_command(), "stop", "--force"], env=full_env, stdout=out, stderr=out, timeout=60
            )


def _run(command: list[str], env: dict[str, str], out: Any) -> None:
    result = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed (exit {result.returncode})")
