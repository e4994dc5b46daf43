"""The served models and their engines: loaded once at start-up, watched while they serve.

Readiness tells the truth: the service is ready once every model folder is loaded, checked and
warm. A refused folder keeps it not ready, naming the folder and why, unless the operator opted
in to serving the rest (`FLOW_SERVE_PARTIAL`); then /readyz and /models list what was refused.

The watchdog (`watch`, an asyncio task of the app) looks at every engine twice a second. An
engine that died, or that finished no pass for `FLOW_ENGINE_STALL_S` while work waited, is given
up: every request waiting on it gets 503 with Retry-After at once, /readyz turns 503 naming the
model, one log line says why, the fault is counted, and a fresh engine takes its place (the model
itself is not reloaded). When the new engine has answered a one-row probe, the model is ready
again. An engine that fails more than `FLOW_ENGINE_MAX_RESTARTS` times within
`FLOW_ENGINE_RESTART_WINDOW_S` (a device that stays broken) makes the service fatal: /readyz
stays 503 and `on_fatal` is called, which `python -m service` answers by shutting down with exit
code 1 so that its supervisor (Docker, Kubernetes, Ray) starts a fresh process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from service.devices import resolve_device
from service.engine import Engine, Job
from service.errors import ModelNotFound, NotReady, one_line
from service.loader import LoadedModel, check_models_dir, load_models
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("flowserve.registry")


@dataclass(eq=False)
class Served:
    model: LoadedModel
    engine: Engine
    metrics: Metrics
    recovering: str | None = None
    """Set while a replaced engine has not yet answered its probe: why it was replaced."""
    restarts: deque[float] = field(default_factory=deque)


class ModelLookup:
    """Finding a served model by name, for `Registry` and `service.remote.RemoteRegistry`: both
    keep `served`, `refused`, `default`, `ready` and `fatal`."""

    served: dict[str, Any]
    refused: dict[str, str]
    default: str | None
    ready: bool
    fatal: str | None

    def get(self, name: str | None) -> Any:
        """The served model `name` (None: the default one); NotReady or ModelNotFound."""
        if not self.ready:
            raise NotReady("not ready: models are loading")
        if self.fatal is not None:
            raise NotReady(f"not ready: {self.fatal}")
        if name is None:
            if self.default is None:
                raise ModelNotFound("model: no model is loaded")
            name = self.default
        served = self.served.get(name)
        if served is None:
            raise ModelNotFound(self.unknown(name))
        return served

    def unknown(self, name: str) -> str:
        """The one message of a 404 for a model name."""
        known = ", ".join(sorted(self.served)) or "none"
        refused = f"; refused: {name}: {self.refused[name]}" if name in self.refused else ""
        return f"model: unknown model {name!r}; loaded: {known}{refused}"


class Registry(ModelLookup):
    """Holds the served models; `ready` turns True once every model folder is loaded and warm."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        on_fatal: Callable[[str], None] | None = None,
        start_engine: Callable[[Engine], None] | None = None,
    ):
        self.settings = settings
        self.start_engine = start_engine or Engine.start
        """How a new engine starts: on a thread of its own, unless its owner drives it
        (`service.engine_process`)."""
        self.metrics = metrics
        self.device = resolve_device(settings.device)
        self.served: dict[str, Served] = {}
        self._gauges: dict[str, tuple[Any, Any]] = {}
        self.refused: dict[str, str] = {}
        self.default: str | None = None
        self.ready = False
        self.closed = False
        self.fatal: str | None = None
        self.on_fatal = on_fatal
        self.watching = False
        """True while `watch` runs."""

    def load(self) -> None:
        """Blocking: load, warm and start an engine for every model folder."""
        settings = self.settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        models = load_models(
            settings.models_dir,
            self.device,
            refused=self.refused,
            rewrites=settings.graph_rewrites,
            fused_min_rows=settings.fused_min_rows,
            warmup_passes=settings.warmup_passes,
            warmup_rows=min(settings.max_batch_rows, 1024),
        )
        for name, model in models.items():
            if self.closed:
                return
            engine = self._engine(model)
            self.served[name] = Served(model, engine, self.metrics)
            self.start_engine(engine)
        if settings.default_model and settings.default_model not in self.served:
            log.error(
                "default model %s is not loaded; using the first in name order",
                settings.default_model,
            )
        if settings.default_model in self.served:
            self.default = settings.default_model
        else:
            self.default = next(iter(sorted(self.served)), None)
        self.ready = True
        log.info("ready: serving %s", ", ".join(sorted(self.served)) or "no model")

    def _engine(self, model: LoadedModel) -> Engine:
        settings, name = self.settings, model.name
        return Engine(
            model,
            max_batch_rows=settings.max_batch_rows,
            block_rows=settings.block_rows,
            max_queue_rows=settings.max_queue_rows,
            chunk_rows=settings.chunk_rows,
            single_thread_rows=settings.single_thread_rows,
            on_pass=self.metrics.tally(self.metrics.pass_rows, name).observe,
            on_pass_jobs=self.metrics.tally(self.metrics.pass_requests, name).observe,
            on_drop=lambda reason, rows: self.metrics.rows_dropped.labels(name, reason).inc(rows),
            on_model_error=self.metrics.model_errors.labels(name).inc,
        )

    def close(self) -> None:
        self.closed = True
        for served in self.served.values():
            served.engine.stop(timeout=10)

    # ------------------------------------------------------------------ readiness

    def not_ready(self) -> str | None:
        """Why the service is not ready, or None when it is."""
        if self.fatal is not None:
            return f"not ready: {self.fatal}"
        if not self.ready:
            return "not ready: models are loading"
        if self.refused and not self.settings.serve_partial:
            name, reason = next(iter(sorted(self.refused.items())))
            more = len(self.refused) - 1
            also = f" (and {more} more)" if more else ""
            return (
                f"not ready: model {name} was refused: {reason}{also}; fix the folder, or set "
                "FLOW_SERVE_PARTIAL=true to serve the others"
            )
        if not self.served:
            return "not ready: no model is loaded"
        for name, served in sorted(self.served.items()):
            if served.recovering is not None:
                return f"not ready: model {name} is recovering: {served.recovering}"
        return None

    def refresh_gauges(self, served: Served | None = None) -> None:
        """Set the queue gauges of `served`'s model, or of every model."""
        for one in self.served.values() if served is None else [served]:
            gauges = self._gauges.get(one.model.name)
            if gauges is None:  # labels() takes a lock and a lookup: once per model
                name, metrics = one.model.name, self.metrics
                gauges = metrics.queue_rows.labels(name), metrics.queue_requests.labels(name)
                self._gauges[name] = gauges
            gauges[0].set(one.engine.queued_rows)
            gauges[1].set(one.engine.queued_jobs)

    # ------------------------------------------------------------------ watchdog

    async def watch(self) -> None:
        """Check every engine every FLOW_WATCHDOG_INTERVAL_S, until cancelled."""
        self.watching = True
        try:
            while True:
                await asyncio.sleep(self.settings.watchdog_interval_s)
                await self.check_engines()
        finally:
            self.watching = False

    async def check_engines(self) -> None:
        """Replace every engine that died or stalls; probe the replacements."""
        for name, served in list(self.served.items()):
            if self.closed or self.fatal is not None:
                return
            reason = served.engine.health(self.settings.engine_stall_s)
            if reason is not None:
                self._replace(name, served, reason)
            if served.recovering is not None:
                await self._probe(name, served)

    def _replace(self, name: str, served: Served, reason: str) -> None:
        kind = "died" if served.engine.failure is not None else "stalled"
        waiting = served.engine.queued_jobs
        served.engine.abandon(reason)
        self.metrics.engine_faults.labels(name, kind).inc()
        now = time.monotonic()
        window = self.settings.engine_restart_window_s
        while served.restarts and now - served.restarts[0] > window:
            served.restarts.popleft()
        if len(served.restarts) >= self.settings.engine_max_restarts:
            self.fatal = (
                f"the engine of model {name} failed {len(served.restarts) + 1} times within "
                f"{window:g} s (FLOW_ENGINE_MAX_RESTARTS, FLOW_ENGINE_RESTART_WINDOW_S); last: "
                f"{reason}"
            )
            log.error("%s; the service stops serving", self.fatal)
            if self.on_fatal is not None:
                self.on_fatal(self.fatal)
            return
        served.restarts.append(now)
        log.error(
            "engine of model %s %s (%s): %d waiting requests got 503; restarting it",
            name,
            kind,
            reason,
            waiting,
        )
        served.recovering = reason
        served.engine = self._engine(served.model)
        self.start_engine(served.engine)
        self.metrics.engine_restarts.labels(name).inc()

    async def _probe(self, name: str, served: Served) -> None:
        """One row, one step on the new engine; the model is ready again when it answers."""
        _, x, c = served.model.field.example(1)
        job = Job(z0=x, solver="euler", num_steps=1, condition=c)
        job.deadline = served.engine.clock() + self.settings.engine_stall_s
        try:
            await served.engine.run(job)
        except Exception as exc:  # the new engine's own health check will see it
            log.error("engine of model %s: the probe after a restart failed: %s", name, exc)
            return
        log.info("engine of model %s restarted and serving", name)
        served.recovering = None


class ModelsNotReady(RuntimeError):
    """The models of a `load_ready` did not all load and warm: the message is one line."""


async def load_ready(
    settings: Settings, *, on_fatal: Callable[[str], None] | None = None
) -> Registry:
    """Load, check and warm every model of `settings.models_dir` and return once they serve;
    for a host that must not route traffic to the app before that, such as a Ray Serve replica
    (`create_app(settings, registry=...)` then serves them). Raises ModelsNotReady with the line
    /readyz would give (an empty or missing models dir, a refused folder without
    FLOW_SERVE_PARTIAL, a crash while loading); nothing is left running then."""
    try:
        check_models_dir(settings.models_dir)
    except ValueError as exc:
        raise ModelsNotReady(str(exc)) from None
    registry = Registry(settings, Metrics(), on_fatal=on_fatal)
    try:
        await asyncio.to_thread(registry.load)
    except Exception as exc:
        registry.close()
        raise ModelsNotReady(f"model loading failed: {one_line(exc)}") from None
    reason = registry.not_ready()
    if reason is not None:
        registry.close()
        raise ModelsNotReady(reason.removeprefix("not ready: "))
    return registry
