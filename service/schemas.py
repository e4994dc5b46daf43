"""Wire schemas: what the endpoints accept and answer. Limits that are settings are checked in
`service.sampling`; what can be told from the body alone is checked here (422)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.tableau import SOLVER_NAMES

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# minItems only documents what `_check_rows` enforces, with its messages.
Point = Annotated[list[FiniteFloat], Field(json_schema_extra={"minItems": 1})]
Points = Annotated[list[Point], Field(json_schema_extra={"minItems": 1})]
SolverName = Literal[SOLVER_NAMES]
DivergenceMethod = Literal["exact", "hutchinson"]

MAX_SEED = 2**63 - 1

ModelField = Annotated[
    str | None,
    Field(
        description="Model name; left out, the default model serves.",
        max_length=64,
        examples=["four-gaussians"],
    ),
]
StepsField = Annotated[
    int, Field(ge=1, description="K: the number of solver steps from t = 0 to t = 1.")
]
SolverField = Annotated[
    SolverName,
    Field(description="euler (the contract's), midpoint, heun or rk4: 1, 2, 2, 4 passes a step."),
]
TimeoutField = Annotated[
    float | None,
    Field(gt=0, description="Seconds before the answer is 504; capped by FLOW_REQUEST_TIMEOUT_S."),
]


def _check_rows(points: list[list[float]] | None, field: str) -> None:
    if points is None:
        return
    if not points:
        raise ValueError(f"{field}: must hold at least one point")
    width = len(points[0])
    if width == 0:
        raise ValueError(f"{field}: points must have at least one coordinate")
    for i, row in enumerate(points):
        if len(row) != width:
            raise ValueError(
                f"{field}: rows must all have the same length; row 0 has {width}, "
                f"row {i} has {len(row)}"
            )


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SampleRequest(_Request):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "four-gaussians", "num_samples": 4, "num_steps": 100, "seed": 7}]
        }
    )

    model: ModelField = None
    num_samples: int | None = Field(
        None, ge=1, description="Points to draw from the source; may be left out with x0."
    )
    num_steps: StepsField = 100
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Seeds the start points; left out, a fresh one is drawn and echoed back.",
    )
    x0: Points | None = Field(
        None, description="Start points (num_samples, dim) instead of draws from the source."
    )
    solver: SolverField = "euler"
    timeout_s: TimeoutField = None

    @model_validator(mode="after")
    def _check(self) -> SampleRequest:
        _check_rows(self.x0, "x0")
        if self.x0 is None and self.num_samples is None:
            raise ValueError("num_samples: required when x0 is not given")
        if (
            self.x0 is not None
            and self.num_samples is not None
            and self.num_samples != len(self.x0)
        ):
            raise ValueError(
                f"num_samples: {self.num_samples} disagrees with x0 ({len(self.x0)} points)"
            )
        return self

    @property
    def rows(self) -> int:
        return len(self.x0) if self.x0 is not None else int(self.num_samples)


class TrajectoryRequest(SampleRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "four-gaussians",
                    "num_samples": 2,
                    "num_steps": 4,
                    "seed": 7,
                    "stride": 2,
                }
            ]
        }
    )

    stride: int = Field(1, ge=1, description="Keep every stride-th state; the last is always kept.")

    @model_validator(mode="after")
    def _check_stride(self) -> TrajectoryRequest:
        if self.stride > self.num_steps:
            raise ValueError(f"stride: {self.stride} is larger than num_steps ({self.num_steps})")
        return self


class EncodeRequest(_Request):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "four-gaussians", "x": [[4.0, 4.0], [-4.0, 3.5]], "num_steps": 100}
            ]
        }
    )

    model: ModelField = None
    x: Points = Field(description="Data points (n, dim) to map back to the source at t = 0.")
    num_steps: StepsField = 100
    solver: SolverField = "euler"
    timeout_s: TimeoutField = None

    @model_validator(mode="after")
    def _check(self) -> EncodeRequest:
        _check_rows(self.x, "x")
        return self

    @property
    def rows(self) -> int:
        return len(self.x)


class LogProbRequest(EncodeRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "four-gaussians",
                    "x": [[4.0, 4.0]],
                    "num_steps": 100,
                    "divergence": "exact",
                }
            ]
        }
    )

    divergence: DivergenceMethod | None = Field(
        None,
        description="exact (Jacobian trace; default up to FLOW_MAX_EXACT_DIVERGENCE_DIM) "
        "or hutchinson (unbiased Rademacher probes).",
    )
    num_probes: int | None = Field(
        None, ge=1, description="Hutchinson probes per point (default 1); only with hutchinson."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seeds the Hutchinson probes.")

    @model_validator(mode="after")
    def _check_probes(self) -> LogProbRequest:
        if self.num_probes is not None and self.divergence == "exact":
            raise ValueError("num_probes: only applies to divergence 'hutchinson'")
        return self


class _Answer(BaseModel):
    model: str
    num_samples: int
    num_steps: int
    dim: int
    solver: SolverName
    nfe: int = Field(description="Network evaluations per point: num_steps x solver stages.")


class _Seeded(_Answer):
    seed: int | None = Field(description="The seed of the start points; null when x0 was given.")


class SampleResponse(_Seeded):
    samples: list[list[float]]


class TrajectoryResponse(_Seeded):
    stride: int
    times: list[float]
    trajectory: list[list[list[float]]]


class EncodeResponse(_Answer):
    latents: list[list[float]]


class LogProbResponse(_Answer):
    divergence: DivergenceMethod
    num_probes: int | None
    seed: int | None = Field(description="The seed of the Hutchinson probes; null for exact.")
    log_prob: list[float] = Field(
        description="log p1(x) in nats: log_p0 - divergence_integral, one per point."
    )
    log_p0: list[float] = Field(description="The source's log-density at the latents.")
    divergence_integral: list[float] = Field(
        description="Integral over t from 0 to 1 of (div v)(t, x_t) along the path that ends at "
        "x; positive where the flow spreads mass out."
    )
    divergence_stderr: list[float] | None = Field(
        description="Standard error of the Hutchinson estimate (null for exact or one probe)."
    )
    latents: list[list[float]]


class ErrorResponse(BaseModel):
    detail: str


class ModelsResponse(BaseModel):
    models: list[dict[str, Any]]


class HealthResponse(BaseModel):
    status: str
    models: list[str] | None = None
