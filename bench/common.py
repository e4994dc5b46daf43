"""What the benchmarks share: the reference post's network, a model folder of it, a real
`python -m service` process on a free loopback port, and a process's resident memory."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 900.0
MB = 1024 * 1024


class PostFlow(torch.nn.Module):
    """The reference post's network: Linear/ELU layers on `torch.cat([x, t])`.

    `widths`: (dim + 1, hidden, ..., dim), the in and out sizes of the Linear layers.
    """

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(widths):
            layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ELU()]
        self.net = torch.nn.Sequential(*layers[:-1])  # no activation after the last layer

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """t: (batch, 1), x: (batch, dim) -> velocity (batch, dim)."""
        return self.net(torch.cat([x, t], dim=-1))

    def linears(self) -> list[torch.nn.Linear]:
        return [m for m in self.net if isinstance(m, torch.nn.Linear)]


def write_post_model(root: Path, name: str, *, dim: int = 2, seed: int = 0) -> Path:
    """root/name: the post's network (3 x 64, ELU), random weights, source N(0, 0.5 I)."""
    torch.manual_seed(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    flow = PostFlow([dim + 1, 64, 64, 64, dim]).eval()
    torch.jit.save(torch.jit.script(flow), str(folder / "model.pt"))
    manifest = {
        "format": 1,
        "name": name,
        "dim": dim,
        "source": {
            "means": [[0.0] * dim],
            "covs": [(0.5 * np.eye(dim)).tolist()],
            "weights": [1.0],
        },
        "sha256": hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest(),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def serve(
    models_dir: Path, device: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """A `python -m service` process on a free loopback port, ready; stopped when the block ends."""
    port = free_port()
    settings = {
        "FLOW_DEVICE": device,
        "FLOW_LOG_LEVEL": "warning",
        # The huge requests take minutes on a busy 2-core machine: a deadline must not end them.
        "FLOW_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        **(env or {}),
    }
    command = [sys.executable, "-m", "service", "--models-dir", str(models_dir)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running(command, url, log, settings, lambda: httpx.get(f"{url}/readyz", timeout=2.0)) as s:
        yield s


@contextlib.contextmanager
def running(
    command: Sequence[str],
    url: str,
    log: Path,
    env: dict[str, str],
    probe: Callable[[], httpx.Response],
) -> Iterator[Server]:
    """`command` (a server at `url`, FLOW_* settings from `env` only) until the block ends, once
    `probe()` answers 200; its output goes to `log`."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_")}
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", **env}
    with log.open("ab") as out:
        process = subprocess.Popen(
            list(command),
            cwd=REPO_ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: whatever it spawns is stopped with it
        )
    server = Server(url, process, log)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{command[2]} exited with {process.returncode}:\n{log.read_text()[-3000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if probe().status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[2]} not ready after {READY_TIMEOUT_S:.0f} s ({log})")
            time.sleep(0.2)
        yield server
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to `process`'s group, SIGKILL after 20 s; then SIGKILL to whatever of the group
    outlived it (LitServe's inference workers do not follow their server out)."""
    with contextlib.suppress(ProcessLookupError):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        os.killpg(process.pid, signal.SIGKILL)


def rss_bytes(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values
