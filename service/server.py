"""`python -m service`: parse flags over `FLOW_*` settings and run uvicorn."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import signal
import sys

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.cli import OneLineParser, UsageError
from service.devices import DEVICES, resolve_device
from service.errors import describe_validation
from service.loader import check_models_dir
from service.settings import Settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m service", description="Serve flow-matching models over HTTP."
    )
    parser.add_argument("--models-dir", help="folder of model folders (FLOW_MODELS_DIR)")
    parser.add_argument("--host", help="address to bind (FLOW_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (FLOW_PORT, default 8000)")
    parser.add_argument("--device", choices=DEVICES, help="FLOW_DEVICE")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


FATAL: list[str] = []
"""Why the service gave up, when it did: python -m service then exits 1, not 0."""


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(1 if FATAL else 0)


def _give_up(reason: str) -> None:
    """The service cannot serve: shut down as on SIGTERM (requests in flight get their grace),
    then exit 1 so that the supervisor starts a fresh process."""
    FATAL.append(reason)
    signal.raise_signal(signal.SIGTERM)


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest on 64-bit systems
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks for reuse instead of handing them back to the OS.

    Every forward pass allocates and frees activations of a few MB. By default glibc serves
    those with fresh mappings or trims them off its heap at once (madvise), so each pass pays
    page faults again: the 65,536 x 100 benchmark request took 3.8 s that way and 2.3 s with both
    thresholds raised (either one alone is slower still, as setting one turns off glibc's
    adaptive threshold). The price: up to TRIM_THRESHOLD_BYTES of freed memory stays resident.
    Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"{exc.prog}: error: {exc.message}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
        resolve_device(settings.device)
        check_models_dir(settings.models_dir)
    except ValidationError as exc:
        print(f"flowserve: error: {describe_validation(exc.errors())}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"flowserve: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # uvicorn drains in-flight requests on SIGTERM, then raises the signal again under the handler
    # it found at start; with the default action that kills the process (-15) after a clean stop.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    if settings.keep_freed_memory:
        keep_freed_memory()
    uvicorn.run(
        create_app(settings, on_fatal=_give_up),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # flowserve.access logs one structured line per request instead
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return 1 if FATAL else 0


if __name__ == "__main__":
    sys.exit(main())
