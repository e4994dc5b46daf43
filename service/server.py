"""`python -m service`: parse flags over `FLOW_*` settings and run uvicorn."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError

from service import engine_process
from service.app import create_app
from service.cli import OneLineParser, UsageError
from service.devices import DEVICES, resolve_device
from service.errors import describe_validation
from service.loader import check_models_dir
from service.process import keep_freed_memory
from service.settings import Settings

log = logging.getLogger("flowserve")


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
    if settings.engine == "process" and settings.engine_address is None:
        return serve_with_engine_process(settings)
    uvicorn.run(
        create_app(settings, on_fatal=_give_up),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # flowserve.access logs one structured line per request instead
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return 1 if FATAL else 0


def serve_with_engine_process(settings: Settings) -> int:
    """The engine process first, then the HTTP fronts (FLOW_HTTP_WORKERS) until SIGTERM, then
    the engine process. When the engine process exits on its own, the fronts answer 503 at once
    and shut down, and this returns 1: the supervisor starts the service afresh."""
    workdir = Path(tempfile.mkdtemp(prefix="flowserve-"))
    address = f"ipc://{workdir / 'engine.sock'}"
    settings = settings.model_copy(update={"engine_address": address})
    engine = engine_process.start(settings, address)
    stopping = threading.Event()

    def watch_engine() -> None:
        engine.process.join()
        if not stopping.is_set():
            reason = f"the engine process exited with code {engine.process.exitcode}"
            log.error("%s; stopping the service", reason)
            _give_up(reason)

    threading.Thread(target=watch_engine, name="engine-watch", daemon=True).start()
    try:
        if settings.http_workers == 1:
            app: Any = create_app(settings, on_fatal=_give_up)
        else:
            export_settings(settings)  # the workers build their settings from the environment
            app = "service.app:create_app"
        uvicorn.run(
            app,
            factory=settings.http_workers > 1,
            workers=settings.http_workers,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            timeout_graceful_shutdown=settings.shutdown_grace_s,
        )
    finally:
        stopping.set()
        engine.stop()  # the fronts have answered what they held
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if FATAL else 0


def export_settings(settings: Settings) -> None:
    """Every setting into FLOW_* environment variables, as `Settings()` reads them back."""
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            os.environ.pop(f"FLOW_{name.upper()}", None)
            continue
        if name == "api_key":
            value = settings.api_key.get_secret_value()
        text = json.dumps(value) if isinstance(value, list | dict | bool) else str(value)
        os.environ[f"FLOW_{name.upper()}"] = text


if __name__ == "__main__":
    sys.exit(main())
