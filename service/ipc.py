"""The wire between the HTTP fronts and the engine process: ZeroMQ messages of one JSON header
frame followed by one raw frame per tensor.

Tensors cross as their bytes (dtype and shape in the header), never pickled and never row by row:
a 65,536 x 2 answer is one 512 KiB frame. Jobs, their results and their errors are described by
plain fields, so either side can be read without the other's objects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import torch
import zmq

from service import errors
from service.engine import Divergence, Draw, Job, JobResult

DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}
log = logging.getLogger("flowserve.ipc")


class Channel:
    """A ZeroMQ socket driven by the running asyncio loop.

    The loop watches the socket's file descriptor and hands every message that has arrived to
    `on_message(frames)`; `send` never blocks (no high-water mark: the engine's bounded queue is
    the limit). This costs a few microseconds a message, where zmq.asyncio's future per receive
    and per send cost the engine process a sixth of its interpreter time under load. ZeroMQ's
    descriptor only signals a change, so the socket is drained until empty each time, and looked
    at again after every send (a send may consume the signal of a message that arrived).
    """

    def __init__(self, socket: zmq.Socket, on_message: Callable[[list], None]):
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.RCVHWM, 0)
        self.socket = socket
        self.on_message = on_message
        self.loop = asyncio.get_running_loop()
        self.fd = socket.getsockopt(zmq.FD)
        self.loop.add_reader(self.fd, self._drain)
        self.loop.call_soon(self._drain)  # what came before the loop watched

    def _drain(self) -> None:
        socket = self.socket
        while not socket.closed and readable(socket):
            frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            try:
                self.on_message(frames)
            except Exception:  # one bad message must not stop the channel
                log.exception("ipc: a message could not be handled")

    def send(self, frames: list) -> None:
        """Send a message; nothing once the channel is closed (the process is stopping)."""
        if self.socket.closed:
            return
        self.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
        if readable(self.socket):
            self.loop.call_soon(self._drain)

    def close(self) -> None:
        if not self.socket.closed:
            self.loop.remove_reader(self.fd)
            self.socket.close(linger=0)


_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def readable(socket: zmq.Socket) -> bool:
    """Whether a message waits on `socket`, without a system call. Plain ints for the option
    and the flag: pyzmq's enum members cost an enum construction per use."""
    return bool(socket.get(_EVENTS) & _POLLIN)


def control_address(address: str) -> str:
    """The engine process's second socket, beside its jobs socket at `address`: status, metrics,
    and the answers its driver thread cannot send (`service.engine_process`)."""
    return address + ".control"


def encode(header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> list:
    """Frames of a message: the header (with the tensors' names, dtypes and shapes), then each
    tensor's bytes (a memoryview of its CPU copy, sent without another copy)."""
    specs = []
    frames: list[Any] = [b""]
    for name, tensor in (tensors or {}).items():
        if tensor.device.type != "cpu" or tensor.requires_grad or not tensor.is_contiguous():
            tensor = tensor.detach().to("cpu").contiguous()
        array = tensor.numpy()
        specs.append({"name": name, "dtype": array.dtype.name, "shape": array.shape})
        frames.append(memoryview(array).cast("B"))
    frames[0] = orjson.dumps({**header, "tensors": specs})
    return frames


def decode(frames: list) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors by name) of a message's frames."""
    header = orjson.loads(bytes(frames[0]))
    tensors = {}
    for spec, frame in zip(header.pop("tensors", []), frames[1:], strict=True):
        # A writable copy of the frame's bytes: torch refuses to wrap read-only memory quietly.
        array = np.frombuffer(bytearray(frame), dtype=spec["dtype"]).reshape(spec["shape"])
        tensors[spec["name"]] = torch.from_numpy(array)
    return header, tensors


def job_message(job: Job, model: str, job_id: int, timeout_s: float | None) -> list:
    """A submit message: everything the engine process needs to rebuild and run `job`."""
    header: dict[str, Any] = {
        "op": "submit",
        "id": job_id,
        "model": model,
        "solver": job.solver,
        "num_steps": job.num_steps,
        "t0": job.t0,
        "t1": job.t1,
        "keep": job.keep,
        "divergence": None
        if job.divergence is None
        else {"method": job.divergence.method, "probes": job.divergence.probes},
        "guidance": job.guidance,
        "velocity": job.velocity,
        "timeout_s": timeout_s,
        "rows": job.rows,
        "width": job.width,
        "draw": None,
    }
    if isinstance(job.z0, Draw):
        header["draw"] = {"seed": job.z0.seed, "rows": job.z0.rows}
    tensors = {}
    if isinstance(job.z0, torch.Tensor):
        tensors["z0"] = job.z0
    if job.probes is not None:
        tensors["probes"] = job.probes
    if job.condition is not None:
        tensors["condition"] = job.condition
    return encode(header, tensors)


def read_job(header: dict[str, Any], tensors: dict[str, torch.Tensor], device) -> Job:
    """The Job a submit message describes, its tensors moved to the engine's `device`."""
    draw = header["draw"]
    z0: torch.Tensor | Draw = (
        Draw(draw["seed"], draw["rows"]) if draw is not None else tensors["z0"].to(device)
    )
    divergence = header["divergence"]
    move = lambda name: None if name not in tensors else tensors[name].to(device)  # noqa: E731
    return Job(
        z0=z0,
        solver=header["solver"],
        num_steps=header["num_steps"],
        t0=header["t0"],
        t1=header["t1"],
        keep=header["keep"],
        divergence=None if divergence is None else Divergence(**divergence),
        probes=move("probes"),
        condition=move("condition"),
        guidance=header["guidance"],
        velocity=header["velocity"],
        rows=header["rows"],
        width=header["width"],
    )


def result_message(job_id: int, result: JobResult) -> list:
    tensors = {"final": result.final}
    if result.trajectory is not None:
        tensors["trajectory"] = result.trajectory
    return encode({"op": "result", "id": job_id}, tensors)


def read_result(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> JobResult:
    return JobResult(tensors["final"], tensors.get("trajectory"))


def error_message(job_id: int, error: BaseException) -> list:
    kind = type(error).__name__ if isinstance(error, errors.ServiceError) else "ModelFailed"
    return encode({"op": "error", "id": job_id, "kind": kind, "detail": str(error)})


def read_error(header: dict[str, Any]) -> errors.ServiceError:
    """The domain error an error message names (ServiceError for a name this side lacks)."""
    kind = getattr(errors, header["kind"], errors.ServiceError)
    if not (isinstance(kind, type) and issubclass(kind, errors.ServiceError)):
        kind = errors.ServiceError
    error = kind.__new__(kind)
    Exception.__init__(error, header["detail"])
    return error
