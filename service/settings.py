"""Service settings: flags or `FLOW_*` environment variables, every limit with a safe default."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Everything the service can be told. The README's settings table lists these fields."""

    model_config = SettingsConfigDict(env_prefix="FLOW_", frozen=True, extra="ignore")

    models_dir: Path = Field(PROJECT_ROOT / "models", description="Folder of model folders.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when available, else CPU."
    )
    default_model: str | None = Field(
        None, description="Model used when a request names none; else the first in name order."
    )
    api_key: SecretStr | None = Field(
        None, description="Bearer key(s), comma-separated; unset means no authentication."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    docs: bool = Field(
        True,
        description="Serve /docs (Swagger UI, its assets local) and /openapi.json; open even "
        "with FLOW_API_KEY, whose key Authorize sends.",
    )

    # Request limits: past them a request gets 413 naming the limit.
    max_samples: int = Field(1_048_576, ge=1, description="Rows in one request.")
    max_steps: int = Field(10_000, ge=1, description="num_steps of one request.")
    max_row_steps: int = Field(
        200_000_000, ge=1, description="Rows x network evaluations of one request."
    )
    max_trajectory_values: int = Field(
        50_000_000, ge=1, description="Kept states x rows x dim of one /trajectory answer."
    )
    max_divergence_row_steps: int = Field(
        20_000_000,
        ge=1,
        description="Rows x evaluations x divergence passes of one /log_prob request.",
    )
    max_exact_divergence_dim: int = Field(
        16, ge=1, description="Largest dim whose /log_prob defaults to the exact divergence."
    )
    max_probes: int = Field(256, ge=1, description="num_probes of one /log_prob request.")
    max_probe_values: int = Field(
        50_000_000,
        ge=1,
        description="Rows x num_probes x dim of one Hutchinson /log_prob request (held in memory).",
    )
    max_abs_input: float = Field(
        1e6, gt=0, description="Largest |coordinate| of x0 or x; beyond it, 422."
    )
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Request body size.")

    # Engine.
    max_batch_rows: int = Field(16_384, ge=1, description="Rows in one forward pass.")
    block_rows: int = Field(
        2048, ge=1, description="A request's rows advance in blocks of this size."
    )
    chunk_rows: int = Field(
        16_384,
        ge=1,
        description="A pass evaluates its rows in chunks of at most this size.",
    )
    single_thread_rows: int = Field(
        4096,
        ge=0,
        description="Passes of fewer rows run on one CPU thread (less synchronisation); 0: never.",
    )
    fused_min_rows: int = Field(
        128,
        ge=0,
        description="With the onednn rewrite, passes of fewer rows run the unfused graph "
        "(fused kernels cost more per call than they save on a few rows).",
    )
    max_queue_rows: int = Field(
        4_194_304, ge=1, description="Rows admitted (running or waiting); past it 503."
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Deadline of a request; a request's timeout_s is capped by it."
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 503 answers.")
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM, time given to requests in flight."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op CPU threads; unset keeps torch's default."
    )
    graph_rewrites: tuple[Literal["freeze", "elu", "time_fold", "onednn"], ...] = Field(
        ("freeze", "onednn"),
        description="Rewrites of loaded graphs (service.fastpath), each checked on a probe; "
        "JSON list, [] for none.",
    )
    keep_freed_memory: bool = Field(
        True,
        description="python -m service: glibc keeps freed memory for reuse (faster large passes).",
    )
    warmup_passes: int = Field(3, ge=0, description="Forward passes per model before ready.")
    serve_partial: bool = Field(
        False,
        description="Serve the models that load when others are refused (/readyz and /models "
        "then list the refused ones); false: a refused model keeps /readyz at 503.",
    )

    playground: bool = Field(
        True,
        description="Serve /playground, a page that draws what the models do from this "
        "server's API; open like /docs (it holds no secret), its calls carry the key typed in.",
    )

    # Processes (python -m service).
    engine: Literal["thread", "process"] = Field(
        "thread",
        description="Where python -m service runs the engines: a thread of the one process, or "
        "a process of their own, which the HTTP fronts reach over a local socket.",
    )
    http_workers: int = Field(
        1,
        ge=1,
        description="HTTP front processes sharing the port (with FLOW_ENGINE=process): every "
        "request of every front is batched with every other in the engine process.",
    )
    engine_address: str | None = Field(
        None,
        description="Internal: the engine process's socket, set by python -m service for its "
        "fronts; an app given one serves through it instead of loading models.",
    )

    # The engine watchdog (service.registry).
    engine_stall_s: float = Field(
        60.0,
        gt=0,
        description="An engine that finishes no pass for this long while work waits is "
        "replaced; its waiting requests get 503.",
    )
    engine_max_restarts: int = Field(
        3,
        ge=0,
        description="Engine replacements allowed within FLOW_ENGINE_RESTART_WINDOW_S; one more "
        "and python -m service exits 1 for its supervisor to restart it.",
    )
    engine_restart_window_s: float = Field(
        300.0, gt=0, description="The window of FLOW_ENGINE_MAX_RESTARTS."
    )
    watchdog_interval_s: float = Field(
        0.5, gt=0, description="How often the watchdog looks at the engines."
    )

    @model_validator(mode="after")
    def _check_engine(self) -> Settings:
        if self.block_rows > self.max_batch_rows:
            raise ValueError(
                f"block_rows ({self.block_rows}) must not exceed max_batch_rows "
                f"({self.max_batch_rows}): lower FLOW_BLOCK_ROWS or raise FLOW_MAX_BATCH_ROWS"
            )
        if self.max_samples > self.max_queue_rows:
            raise ValueError(
                f"max_samples ({self.max_samples}) must not exceed max_queue_rows "
                f"({self.max_queue_rows}): a request that large could never be admitted"
            )
        if self.http_workers > 1 and self.engine != "process":
            raise ValueError(
                f"http_workers: {self.http_workers} fronts need FLOW_ENGINE=process (fronts with "
                "an engine each would not batch each other's requests)"
            )
        if self.api_key is not None and not self.api_keys():
            raise ValueError(
                "api_key: FLOW_API_KEY is set but holds no key; unset it to turn authentication off"
            )
        return self

    def api_keys(self) -> list[bytes]:
        """The accepted bearer keys, as bytes for constant-time comparison."""
        if self.api_key is None:
            return []
        raw = self.api_key.get_secret_value()
        return [key.strip().encode() for key in raw.split(",") if key.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
