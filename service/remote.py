"""An HTTP front's view of the engine process: the same interface as the in-process registry and
engines (`service.registry`, `service.engine`), over a ZeroMQ socket (`service.ipc`).

`RemoteRegistry` learns the models (their manifests) and readiness from the engine process, and
polls its status: readiness, each model's queue and health. `RemoteEngine.run` submits a job and
awaits its answer; admission against the bounded queue happens in the engine process, so every
front shares one queue. A job whose deadline passes, or whose client goes away, is cancelled
there. When the engine process is gone, every waiting request fails at once with 503 and
/readyz says so; `python -m service` then exits 1 for its supervisor to start it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from service import ipc
from service.engine import Job, JobResult
from service.errors import DeadlineExceeded, EngineFailed
from service.loader import ModelInfo
from service.metrics import Metrics
from service.registry import ModelLookup
from service.settings import Settings

log = logging.getLogger("flowserve.remote")
STATUS_INTERVAL_S = 0.25
STATUS_TIMEOUT_S = 5.0
DEADLINE_GRACE_S = 1.0
"""How long past a job's deadline a front waits for the engine process to answer it."""


class EngineGone(EngineFailed):
    """The engine process does not answer: it exited, or stopped reading its socket."""


class Link:
    """One front's sockets to the engine process, requests by id and replies dispatched to them:
    jobs and their cancels go to the engine's driver, status and metrics questions to its
    control socket; an answer may come back on either."""

    def __init__(self, address: str, on_gone: Callable[[str], None]):
        self.address = address
        self.on_gone = on_gone
        self.context = zmq.Context()
        self.waiting: dict[int, asyncio.Future] = {}
        self.ids = itertools.count()
        self.gone: str | None = None
        # Both sockets carry this name, so the engine process can answer on either.
        self.identity = f"front-{os.getpid()}-{secrets.token_hex(4)}".encode()
        self.channel: ipc.Channel | None = None
        self.control: ipc.Channel | None = None
        self.watching: ipc.Channel | None = None

    def start(self) -> None:
        """Connect (in the running loop, which then reads the sockets)."""
        jobs = self._socket(self.address)
        # Told at once when the engine process's end of the socket goes away (it exited).
        monitor = jobs.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.channel = ipc.Channel(jobs, self._receive)
        self.control = ipc.Channel(self._socket(ipc.control_address(self.address)), self._receive)
        self.watching = ipc.Channel(
            monitor, lambda _: self.on_gone("the engine process closed its socket (it exited)")
        )

    def _socket(self, address: str) -> zmq.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTING_ID, self.identity)
        socket.connect(address)
        return socket

    def _receive(self, frames: list) -> None:
        header, tensors = ipc.decode(frames)
        future = self.waiting.pop(header.get("id"), None)
        if future is not None and not future.done():
            future.set_result((header, tensors))

    def expect(self) -> tuple[int, asyncio.Future]:
        """A new request id and the future its reply will settle."""
        if self.gone is not None:
            raise EngineGone(self.gone)
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = future
        return request_id, future

    def send(self, frames: list) -> None:
        """To the driver: a job, or a cancel."""
        self.channel.send(frames)

    def ask(self, frames: list) -> None:
        """To the control socket: a status or metrics question."""
        self.control.send(frames)

    def forget(self, request_id: int) -> None:
        self.waiting.pop(request_id, None)

    def fail_all(self, reason: str) -> None:
        """The engine process is gone: every request waiting on it fails now."""
        self.gone = reason
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(EngineGone(reason))
        self.waiting.clear()

    def close(self) -> None:
        if self.channel is not None:
            self.channel.socket.disable_monitor()
            self.watching.close()
            self.control.close()
            self.channel.close()
        self.context.term()


class RemoteEngine:
    """One model's engine in the engine process: a `service.engine.EngineClient`, as the
    in-process `Engine` is."""

    def __init__(self, link: Link, model: str):
        self.link = link
        self.model_name = model
        self.status: dict[str, Any] = {}
        self.clock = time.monotonic

    def reserve(self, rows: int) -> Callable[[], None]:
        """Admission happens in the engine process (one queue for every front): nothing here."""
        return lambda: None

    async def run(self, job: Job) -> JobResult:
        """Submit `job` and await its answer. The engine process keeps the job's deadline and
        answers when it passes, once the rows are dropped; the front waits DEADLINE_GRACE_S
        longer before it gives up on it. A `job.cancel()` (the client went away) goes there too."""
        timeout = None if job.deadline is None else max(0.0, job.deadline - self.clock())
        request_id, reply = self.link.expect()
        job.on_cancel = lambda reason: self._tell_cancel(request_id, reason)
        try:
            self.link.send(ipc.job_message(job, self.model_name, request_id, timeout))
            wait = None if timeout is None else timeout + DEADLINE_GRACE_S
            header, tensors = await asyncio.wait_for(asyncio.shield(reply), wait)
        except TimeoutError:
            self._cancel(request_id, "deadline")
            raise DeadlineExceeded("deadline passed") from None
        except asyncio.CancelledError:
            self._cancel(request_id, "disconnect")
            raise
        finally:
            job.on_cancel = None
        if header["op"] == "error":
            raise ipc.read_error(header)
        return ipc.read_result(header, tensors)

    def _tell_cancel(self, request_id: int, reason: str) -> None:
        """Ask the engine process to drop the job; its answer (the error) still comes."""
        with contextlib.suppress(Exception):
            self.link.send(ipc.encode({"op": "cancel", "id": request_id, "reason": reason}))

    def _cancel(self, request_id: int, reason: str) -> None:
        self.link.forget(request_id)
        self._tell_cancel(request_id, reason)

    def health(self, stall_s: float) -> str | None:
        return self.link.gone or self.status.get("health")

    @property
    def queued_rows(self) -> int:
        return int(self.status.get("queued_rows", 0))

    @property
    def queued_jobs(self) -> int:
        return int(self.status.get("queued_jobs", 0))

    @property
    def stats(self) -> Any:
        return _Stats(**self.status.get("stats", {}))


@dataclass(frozen=True)
class _Stats:
    passes: int = 0
    max_jobs_in_pass: int = 0
    jobs_done: int = 0


@dataclass(eq=False)
class RemoteServed:
    model: ModelInfo
    engine: RemoteEngine
    metrics: Metrics
    recovering: str | None = None


@dataclass(eq=False)
class RemoteRegistry(ModelLookup):
    """`service.registry.Registry`'s interface, answered from the engine process's status."""

    settings: Settings
    metrics: Metrics
    on_fatal: Callable[[str], None] | None = None
    served: dict[str, RemoteServed] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    default: str | None = None
    ready: bool = False
    closed: bool = False
    fatal: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    link: Link | None = None

    async def connect(self) -> None:
        """Connect, then wait for the engine process to have loaded its models (or given up)."""
        self.link = Link(self.settings.engine_address, self._lost)
        self.link.start()
        while not self.closed:
            try:
                status = await self._status(manifests=True)
            except TimeoutError:
                continue  # still starting
            if status["ready"] or status["fatal"]:
                self._adopt(status)
                return
            await asyncio.sleep(STATUS_INTERVAL_S)

    def _adopt(self, status: dict[str, Any]) -> None:
        for name, entry in status["models"].items():
            model = ModelInfo.from_manifest(entry["manifest"])
            self.served[name] = RemoteServed(model, RemoteEngine(self.link, name), self.metrics)
        self.refused = dict(status["refused"])
        self.default = status["default"]
        self._update(status)
        self.ready = True

    def _update(self, status: dict[str, Any]) -> None:
        self.status = status
        self.fatal = status["fatal"]
        for name, served in self.served.items():
            served.engine.status = status["models"].get(name, {})

    async def _status(self, manifests: bool = False) -> dict[str, Any]:
        return await self._ask({"op": "status", "manifests": manifests})

    async def _ask(self, question: dict[str, Any]) -> dict[str, Any]:
        request_id, reply = self.link.expect()
        try:
            self.link.ask(ipc.encode({**question, "id": request_id}))
            header, _ = await asyncio.wait_for(reply, STATUS_TIMEOUT_S)
        finally:
            self.link.forget(request_id)
        return header

    async def engine_metrics(self) -> bytes:
        """The engine process's own metrics (Prometheus text), for a front that does not share
        metric files with it (`service.metrics.shared`)."""
        return (await self._ask({"op": "metrics"}))["text"].encode()

    async def watch(self) -> None:
        """Poll the engine process: its status, and whether it is there at all."""
        while not self.closed:
            await asyncio.sleep(STATUS_INTERVAL_S)
            pid = self.status.get("pid")
            if pid is not None and not _alive(pid):
                self._lost(f"the engine process (pid {pid}) exited")
                return
            try:
                self._update(await self._status())
            except TimeoutError:
                self._lost(f"the engine process did not answer within {STATUS_TIMEOUT_S:g} s")
                return

    def _lost(self, reason: str) -> None:
        if self.fatal is not None and self.link.gone is not None:
            return  # said once
        log.error("%s: every waiting request gets 503", reason)
        self.fatal = reason
        self.link.fail_all(reason)

    def not_ready(self) -> str | None:
        if self.fatal is not None:
            return f"not ready: {self.fatal}"
        if not self.ready:
            return "not ready: models are loading"
        return self.status.get("not_ready")

    def refresh_gauges(self) -> None:
        """The engine process sets the queue gauges itself."""

    async def close(self) -> None:
        self.closed = True
        if self.link is not None:
            self.link.close()


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
