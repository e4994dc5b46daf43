"""The served models and their engines, loaded once at start-up, read-only afterwards."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from service.devices import resolve_device
from service.engine import Engine
from service.errors import ModelNotFound, NotReady
from service.loader import LoadedModel, load_models
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("flowserve.registry")


@dataclass(eq=False)
class Served:
    model: LoadedModel
    engine: Engine
    metrics: Metrics


class Registry:
    """Holds the served models; `ready` turns True once every loadable model is loaded and warm."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.device = resolve_device(settings.device)
        self.served: dict[str, Served] = {}
        self.default: str | None = None
        self.ready = False
        self.closed = False

    def load(self) -> None:
        """Blocking: load, warm and start an engine for every model folder."""
        settings = self.settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        models = load_models(
            settings.models_dir,
            self.device,
            rewrites=settings.graph_rewrites,
            fused_min_rows=settings.fused_min_rows,
            warmup_passes=settings.warmup_passes,
            warmup_rows=min(settings.max_batch_rows, 1024),
        )
        for name, model in models.items():
            if self.closed:
                return
            engine = Engine(
                model,
                max_batch_rows=settings.max_batch_rows,
                block_rows=settings.block_rows,
                max_queue_rows=settings.max_queue_rows,
                chunk_rows=settings.chunk_rows,
                single_thread_rows=settings.single_thread_rows,
                on_pass=self.metrics.pass_rows.labels(name).observe,
                on_drop=lambda reason, rows, name=name: self.metrics.rows_dropped.labels(
                    name, reason
                ).inc(rows),
            )
            engine.start()
            self.served[name] = Served(model, engine, self.metrics)
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

    def close(self) -> None:
        self.closed = True
        for served in self.served.values():
            served.engine.stop(timeout=10)

    def get(self, name: str | None) -> Served:
        if not self.ready:
            raise NotReady("not ready: models are loading")
        if name is None:
            if self.default is None:
                raise ModelNotFound("model: no model is loaded")
            name = self.default
        served = self.served.get(name)
        if served is None:
            known = ", ".join(sorted(self.served)) or "none"
            raise ModelNotFound(f"model: unknown model {name!r}; loaded: {known}")
        return served

    def refresh_gauges(self) -> None:
        for name, served in self.served.items():
            self.metrics.queue_rows.labels(name).set(served.engine.queued_rows)
            self.metrics.queue_requests.labels(name).set(served.engine.queued_jobs)
