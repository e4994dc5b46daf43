"""What can go wrong, said once: domain errors raised anywhere below the routes, and the one table
that gives each its HTTP status. Every failure answers JSON `{"detail": "..."}` naming the field
and the limit.

The engine, the registry and the per-request operations raise these and know nothing of HTTP
(this module imports no web framework); `service.app` installs the handlers that apply the table,
and a second protocol (another transport, a Ray Serve handle) maps the same classes its own way.
"""

from __future__ import annotations

import re


class ServiceError(Exception):
    """A request that cannot be answered as asked; the message is the user-facing detail."""

    @property
    def detail(self) -> str:
        return str(self)


class InvalidInput(ServiceError):
    """The request does not fit the model: wrong dimension, bad label, coordinates too large."""


class ModelNotFound(ServiceError):
    """No model of that name is served."""


class LimitExceeded(ServiceError):
    """Over a configured limit; the message gives the value, the limit and its setting."""

    def __init__(self, field: str, value: int, limit: int, setting: str):
        super().__init__(f"{field}: {value} is over the limit of {limit} ({setting})")


class NotAcceptable(ServiceError):
    """The answer cannot be given in the media type asked for."""


class Unavailable(ServiceError):
    """Not now: a retry after Retry-After seconds may succeed."""


class NotReady(Unavailable):
    """The models are still loading, or a model was refused."""


class QueueFull(Unavailable):
    def __init__(self, rows: int, queued: int, limit: int):
        super().__init__(
            f"queue full: {queued} rows admitted, this request adds {rows}, "
            f"the limit is {limit} (FLOW_MAX_QUEUE_ROWS); retry later"
        )


class EngineStopped(Unavailable):
    """The engine is shutting down (or has stopped): no new work is taken."""


class EngineFailed(Unavailable):
    """The engine of a model died or stopped making progress; it is being restarted."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its answer was ready; its rows left the batch."""


class Cancelled(ServiceError):
    """The client went away; its rows left the batch."""


class ModelFailed(ServiceError):
    """The model could not be evaluated, or produced NaN or infinity."""


STATUS: dict[type[ServiceError], int] = {
    InvalidInput: 422,
    ModelNotFound: 404,
    LimitExceeded: 413,
    NotAcceptable: 406,
    Unavailable: 503,
    DeadlineExceeded: 504,
    Cancelled: 499,  # nginx's "client closed request": nobody reads it, the access log does
    ModelFailed: 500,
}


def status_of(error: ServiceError) -> int:
    """The HTTP status of `error`: the table's entry for its class or its nearest base."""
    for kind in type(error).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 500


def one_line(exc: BaseException) -> str:
    """The line of an exception's message that says what went wrong. TorchScript errors open
    with "The following operation failed in the TorchScript interpreter." and a traceback; the
    error itself is their last line, after its type ("builtins.RuntimeError: ...")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        return re.sub(r"^(builtins\.)?\w+: ", "", lines[-1])
    return lines[0]


def _location(loc: tuple) -> str:
    """("body", "x0", 3, 1) -> "x0[3][1]"."""
    text = ""
    for part in loc:
        if part == "body" and not text:
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def describe_validation(errors: list[dict]) -> str:
    """One line per problem, `field: message`; model-level checks already name their field."""
    lines = []
    for error in errors:
        message = error.get("msg", "invalid")
        kind = error.get("type", "")
        if kind == "json_invalid":
            lines.append(f"body: not valid JSON ({error.get('ctx', {}).get('error', message)})")
            continue
        if isinstance(error.get("input"), bytes | bytearray):
            lines.append("body: expected a JSON object sent with Content-Type: application/json")
            continue
        message = message.removeprefix("Value error, ")
        location = _location(tuple(error.get("loc", ())))
        if location == "body" and ":" in message.split(" ", 1)[0]:
            lines.append(message)  # a model validator that names its own field
        else:
            lines.append(f"{location}: {message}")
    return "; ".join(dict.fromkeys(lines))
