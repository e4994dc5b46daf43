"""The engine process: every model's engine in a process of its own, behind ZeroMQ sockets.

`python -m service` with FLOW_ENGINE=process starts this process first, then the HTTP fronts
(FLOW_HTTP_WORKERS of them), which reach it through `service.remote`. It loads the models as the
in-process service does (`service.registry`: checks, refusals, warm-up, the engine watchdog), so
every request of every front is batched with every other at step level, and its Python shares no
interpreter lock with the fronts' HTTP work.

Two sockets (`service.ipc`). The jobs socket belongs to the driver thread: "submit" a job
(admitted against the bounded queue of its model's engine, or refused with its error), "cancel"
one (the client went away, or its deadline passed), and each job's answer. The control socket
belongs to the process's asyncio loop: "status" (readiness, each model's queue, health and
counters, and once the manifests), "metrics", and the answers the driver could not send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
import zmq

from service import ipc
from service.engine import Engine, Job, JobResult
from service.errors import ModelFailed, ServiceError, one_line
from service.metrics import Metrics
from service.process import keep_freed_memory
from service.registry import Registry
from service.settings import Settings

log = logging.getLogger("flowserve.engine_process")


IDLE_POLL_MS = 20
"""How long the driver waits on its socket when no engine has work: the longest a job queued
from elsewhere (the watchdog's probe of a restarted engine) waits to be seen."""


class EngineServer:
    """The models' engines and the two sockets they answer on.

    Jobs: one thread, the driver, owns the jobs socket and every engine. It reads what arrived,
    runs one pass of each engine that has work and sends each answer as its job ends: no event
    loop and no hand-off between threads on a job's way (the engines are never started; the
    driver calls `Engine.turn`). Control: the process's asyncio loop owns the control socket,
    which answers status and metrics, and carries the answers settled off the driver (the
    watchdog gave up on an engine), so a pass that never returns leaves the fronts informed.

    That watchdog (`Registry.watch`) replaces an engine whose pass has not returned for
    FLOW_ENGINE_STALL_S; the driver is stuck in that pass, so a new driver takes the jobs socket
    and serves the other engines and the replacement, and the old one leaves when (if ever) its
    pass returns, without touching the socket again.
    """

    def __init__(self, settings: Settings, address: str):
        self.settings = settings
        self.address = address
        self.registry = Registry(
            settings, Metrics(), on_fatal=self._fatal, start_engine=self._adopt
        )
        self.exit_code = 0
        self.stopping: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.jobs: dict[tuple[bytes, int], Job] = {}
        self.halt = threading.Event()
        self.socket: zmq.Socket | None = None  # jobs: the driver's
        self.control: ipc.Channel | None = None  # status, metrics, answers off the driver
        self.driver: threading.Thread | None = None
        self.beat = time.monotonic()
        """When the driver last went round its loop."""
        self.adopted = 0
        """Engines started so far (`_adopt`): the driver lists them again when it changes."""

    async def serve(self, stopping: asyncio.Event) -> None:
        self.stopping = stopping
        self.loop = asyncio.get_running_loop()
        context = zmq.Context()
        self.socket = _bound(context, self.address)
        self.control = ipc.Channel(_bound(context, ipc.control_address(self.address)), self._ask)
        self._start_driver()
        loading = asyncio.create_task(asyncio.to_thread(self.registry.load))
        background = [asyncio.create_task(self._after_loading(loading))]
        try:
            await stopping.wait()
        finally:
            self.registry.closed = True
            for task in background:
                task.cancel()
            with contextlib.suppress(BaseException):
                await loading
            self.halt.set()
            await asyncio.to_thread(self.driver.join)
            self.control.close()
            context.term()

    def _fatal(self, reason: str) -> None:
        """The watchdog gave up on an engine: exit 1; `python -m service` then does the same."""
        self.exit_code = 1
        if self.stopping is not None:
            self.stopping.set()

    async def _after_loading(self, loading: asyncio.Task) -> None:
        try:
            await loading
        except Exception as exc:
            self.registry.fatal = f"model loading failed: {one_line(exc)}"
            log.error("%s", self.registry.fatal)
            return
        await self.registry.watch()

    def _adopt(self, engine: Engine) -> None:
        """How the registry starts an engine here: the driver serves every engine of
        `registry.served`. One that comes while the driver has not gone round for
        FLOW_ENGINE_STALL_S replaces the engine whose pass holds the driver: a new driver."""
        self.adopted += 1  # the driver lists the engines again
        if time.monotonic() - self.beat > self.settings.engine_stall_s:
            log.error("engine process: the driver is stuck in a pass; a new driver takes over")
            self._start_driver()

    # ----------------------------------------------------------------- control

    def _ask(self, message: list) -> None:
        identity, *frames = message
        header, _ = ipc.decode(frames)
        if header["op"] == "status":
            reply = self.status(header)
        elif header["op"] == "metrics":  # for a front whose process does not share metric files
            text = self.registry.metrics.render().decode()
            reply = {"op": "metrics", "id": header["id"], "text": text}
        else:
            return
        self.control.send([identity, *ipc.encode(reply)])

    # ----------------------------------------------------------------- the driver

    def _start_driver(self) -> None:
        self.beat = time.monotonic()
        self.driver = threading.Thread(target=self._drive, name="engine-driver", daemon=True)
        self.driver.start()

    def _drive(self) -> None:
        torch.set_grad_enabled(False)  # thread-local, as on an engine's own thread
        me = threading.current_thread()
        socket, clock, metrics = self.socket, time.monotonic, self.registry.metrics
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        try:
            engines: list[Engine] = []
            seen = -1
            while not self.halt.is_set():
                self.beat = now = clock()
                if seen != self.adopted:  # an engine came (loading) or was replaced
                    seen = self.adopted
                    engines = [served.engine for served in list(self.registry.served.values())]
                if any(engine.has_work for engine in engines):
                    if ipc.readable(socket):
                        self._read()
                else:
                    metrics.flush()  # idle: the last passes' figures reach /metrics now
                    if poller.poll(IDLE_POLL_MS):
                        self._read()
                for engine in engines:
                    if not engine.has_work:
                        engine.last_progress = now  # idle is not stalled
                        continue
                    engine.turn()
                    if self.driver is not me:
                        return  # this pass hung and a new driver took over: leave it all to it
        except Exception:  # the driver must not die quietly: the fronts would wait on it
            log.exception("engine process: the driver failed; stopping")
            self.exit_code = 1
            self.loop.call_soon_threadsafe(self.stopping.set)
        finally:
            if self.driver is me:
                self.registry.close()  # fails what is left (answered here, on the driver)
                socket.close(linger=0)

    def _read(self) -> None:
        socket = self.socket
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._receive(frames)
            except Exception:  # one bad message must not stop the driver
                log.exception("engine process: a message could not be handled")

    def _receive(self, message: list) -> None:
        identity, *frames = message
        header, tensors = ipc.decode(frames)
        if header["op"] == "submit":
            self._submit(identity.bytes, header, tensors)
        elif header["op"] == "cancel":
            job = self.jobs.get((identity.bytes, header["id"]))
            if job is not None:
                job.cancel(header.get("reason", "cancelled"))

    def _submit(self, identity: bytes, header: dict, tensors: dict) -> None:
        key = (identity, header["id"])
        try:
            served = self.registry.get(header["model"])
            engine = served.engine
            job = ipc.read_job(header, tensors, served.model.device)
            release = engine.reserve(job.rows)
        except ServiceError as exc:
            self.socket.send_multipart([identity, *ipc.error_message(header["id"], exc)])
            return
        if header["timeout_s"] is not None:
            job.deadline = engine.clock() + header["timeout_s"]

        def done(result: JobResult | None, error: Exception | None) -> None:
            if self.jobs.pop(key, None) is None:
                return  # answered already
            release()
            self.registry.refresh_gauges(served)  # before the answer: /metrics agrees
            if error is None:
                reply = ipc.result_message(header["id"], result)
            else:
                if not isinstance(error, ServiceError):  # a fault of this process
                    error = ModelFailed(one_line(error))
                reply = ipc.error_message(header["id"], error)
            if threading.current_thread() is self.driver:
                self.socket.send_multipart([identity, *reply], copy=False)
            else:  # the jobs socket is the driver's: this answer goes by the control socket
                self.loop.call_soon_threadsafe(self.control.send, [identity, *reply])

        job.on_done = done
        self.jobs[key] = job
        try:
            engine.submit(job)
        except ServiceError as exc:
            done(None, exc)
            return
        self.registry.refresh_gauges(served)  # the queue gauges are this process's

    def status(self, request: dict) -> dict[str, Any]:
        registry = self.registry
        # Also set as jobs come and go, but such a read can be short (Engine.queued_jobs): the
        # fronts' polls keep /metrics from staying stale longer than a poll.
        registry.refresh_gauges()
        registry.metrics.flush()
        models = {}
        for name, served in registry.served.items():
            engine, stats = served.engine, served.engine.stats
            models[name] = {
                "queued_rows": engine.queued_rows,
                "queued_jobs": engine.queued_jobs,
                "health": engine.health(self.settings.engine_stall_s),
                "stats": {
                    "passes": stats.passes,
                    "max_jobs_in_pass": stats.max_jobs_in_pass,
                    "jobs_done": stats.jobs_done,
                },
            }
            if request.get("manifests"):
                models[name]["manifest"] = served.model.manifest
        return {
            "op": "status",
            "id": request.get("id"),
            "pid": os.getpid(),
            "ready": registry.ready,
            "not_ready": registry.not_ready(),
            "fatal": registry.fatal,
            "default": registry.default,
            "refused": registry.refused,
            "models": models,
        }


def _bound(context: zmq.Context, address: str) -> zmq.Socket:
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(address)
    return socket


@dataclass
class Started:
    """An engine process and the write end of its lifeline (see `start`)."""

    process: multiprocessing.process.BaseProcess
    lifeline: Connection

    def stop(self, timeout: float = 30.0) -> None:
        """Let go of the lifeline (the engine process stops: what waits in it fails), wait for
        it to exit, and kill it if it has not within `timeout` seconds."""
        self.lifeline.close()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def start(settings: Settings, address: str) -> Started:
    """Start an engine process serving `settings`' models on `address`.

    It stops when the returned lifeline is closed, by `Started.stop` or because this process
    died (the kernel closes it then, even after SIGKILL): an engine process never outlives its
    service. It ignores SIGTERM and SIGINT, which a supervisor or a terminal may send to the
    whole process group: the service stops it once its fronts have answered what they hold."""
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(
        target=run, args=(settings.model_dump_json(), address, reader), name="flowserve-engine"
    )
    process.start()
    reader.close()  # the child holds it now; this process keeps only the write end
    return Started(process, writer)


def run(settings_json: str, address: str, lifeline: Connection) -> None:
    """The process's entry (multiprocessing, spawn): serve until the lifeline closes."""
    settings = Settings.model_validate_json(settings_json)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if settings.keep_freed_memory:
        keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_grad_enabled(False)

    async def main() -> int:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()

        def let_go() -> None:
            loop.remove_reader(lifeline.fileno())
            log.info("engine process: the service let go of it (it stopped, or died); stopping")
            stopping.set()

        loop.add_reader(lifeline.fileno(), let_go)
        server = EngineServer(settings, address)
        await server.serve(stopping)
        return server.exit_code

    sys.exit(asyncio.run(main()))
