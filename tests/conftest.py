"""Shared fixtures: tiny model folders and a real `python -m service` process."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_S = 90.0


class ScaledField(torch.nn.Module):
    """v(t, x) = a x: Euler gives x[K] = (1 + a/K)^K x0, which tends to e^a x0."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.a * x + 0.0 * t


def write_model_dir(
    root: Path, name: str = "tiny", *, dim: int = 2, a: float = 0.5, std: float = 1.0
) -> Path:
    """Writes root/name/{model.pt, manifest.json}: v(t, x) = a x, source N(0, std^2 I_dim)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(ScaledField(a)), str(folder / "model.pt"))
    cov = (std**2 * torch.eye(dim)).tolist()
    manifest = {
        "format": 1,
        "name": name,
        "dim": dim,
        "source": {"means": [[0.0] * dim], "covs": [cov], "weights": [1.0]},
        "sha256": hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest(),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir with `tiny` (dim 2, v = 0.5 x)."""
    root = tmp_path_factory.mktemp("models")
    write_model_dir(root, "tiny", dim=2, a=0.5)
    return root


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Polls GET url/readyz until 200; fails with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"server not ready after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_server(
    command: Sequence[str],
    port: int,
    log: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = SERVER_START_TIMEOUT_S,
) -> Iterator[str]:
    """Runs `command` (a server listening on 127.0.0.1:port) until the block ends; yields its URL.

    The process is always terminated, whatever happens in the block.
    """
    if importlib.util.find_spec("service.__main__") is None:
        pytest.skip("the service entry point (service/__main__.py) is not there yet")
    # The caller's FLOW_* settings (an API key, say) must not leak into the server under test.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_")}
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("wb") as out:
        process = subprocess.Popen(
            list(command), cwd=REPO_ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log, timeout)
        yield url
    finally:
        stop(process)


def service_command(models_dir: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "service",
        "--models-dir",
        str(models_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@pytest.fixture(scope="session")
def server_url(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a `python -m service` process serving `tiny_models_dir`, shared by the session."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {"FLOW_DEVICE": "cpu", "FLOW_LOG_LEVEL": "warning"}
    with running_server(service_command(tiny_models_dir, port), port, log, env=env) as url:
        yield url


class PostFlow(torch.nn.Module):
    """The reference post's network: an ELU MLP on concat([x, t])."""

    def __init__(self, dim: int = 2, hidden: int = 64, layers: int = 3) -> None:
        super().__init__()
        sizes = [dim + 1] + [hidden] * layers
        blocks: list[torch.nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            blocks += [torch.nn.Linear(fan_in, fan_out), torch.nn.ELU()]
        blocks.append(torch.nn.Linear(hidden, dim))
        self.net = torch.nn.Sequential(*blocks)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t], dim=-1))


def write_module_dir(
    root: Path, name: str, module: torch.nn.Module, source: dict, dim: int
) -> Path:
    """Scripts `module` into root/name/model.pt with a contract manifest for `source`."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module), str(folder / "model.pt"))
    manifest = {
        "format": 1,
        "name": name,
        "dim": dim,
        "source": source,
        "sha256": hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest(),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def write_post_model(root: Path, name: str = "post", *, dim: int = 2, seed: int = 0) -> Path:
    """A randomly initialised post-style network with source N(0, 0.5 I)."""
    torch.manual_seed(seed)
    source = {
        "means": [[0.0] * dim],
        "covs": [(0.5 * torch.eye(dim)).tolist()],
        "weights": [1.0],
    }
    return write_module_dir(root, name, PostFlow(dim).eval(), source, dim)


@pytest.fixture(scope="session")
def post_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir with `post` (the reference post's architecture, random weights, dim 2)."""
    root = tmp_path_factory.mktemp("post-models")
    write_post_model(root, "post")
    return root


ENGINES = ["thread", "process"]
"""Where the app's engines run: a thread of the app's process, or an engine process of their own
(what `python -m service` starts by default) that the app reaches over a socket."""


@contextlib.contextmanager
def serving(models_dir: Path, engine: str = "thread", **settings: object) -> Iterator[TestClient]:
    """An app (lifespan running) over `models_dir`, ready when the block starts; with engine
    "process", its engines run in an engine process started here and stopped at the end."""
    from service.app import create_app
    from service.settings import Settings

    config = Settings(models_dir=models_dir, device="cpu", **settings)
    with contextlib.ExitStack() as stack:
        if engine == "process":
            config = stack.enter_context(engine_process(config))
        app = create_app(config)
        client = stack.enter_context(TestClient(app))
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while client.get("/readyz").status_code != 200:
            if time.monotonic() > deadline:
                pytest.fail(f"app not ready: {client.get('/readyz').text}")
            time.sleep(0.02)
        yield client


@contextlib.contextmanager
def engine_process(settings):
    """A running engine process for `settings`; yields the settings an app reaches it with."""
    import tempfile

    from service import engine_process as server

    with tempfile.TemporaryDirectory(prefix="flowserve-engine-") as folder:
        address = f"ipc://{folder}/engine.sock"
        started = server.start(settings, address)
        try:
            yield settings.model_copy(update={"engine_address": address})
        finally:
            started.stop()


def euler_reference(module, x0: torch.Tensor, num_steps: int) -> torch.Tensor:
    """An Euler loop written independently of the service: x += (1/K) v(k/K, x)."""
    x = x0.clone()
    with torch.no_grad():
        for k in range(num_steps):
            t = torch.full((x.shape[0], 1), k / num_steps)
            x = x + (1.0 / num_steps) * module(t, x)
    return x


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` run where a CUDA device is (`pytest -m cuda`) and skip elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
