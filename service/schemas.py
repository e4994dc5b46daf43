"""Wire schemas: what the endpoints accept and answer. Limits that are settings are checked in
`service.sampling`; what can be told from the body alone is checked here (422)."""

from __future__ import annotations

import itertools
from contextvars import ContextVar
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    model_validator,
)

from service.tableau import SOLVER_NAMES


def _flatten_rows(value: Any) -> Any:
    """Points of a shaped model may come nested, one (C, H, W) list per row: flattened here to
    rows of C H W numbers (row-major, as numpy's reshape), which the checks below then see."""
    if not (isinstance(value, list) and value and isinstance(value[0], list)):
        return value
    if not (value[0] and isinstance(value[0][0], list)):
        return value
    flat = []
    for row in value:
        while isinstance(row, list) and row and isinstance(row[0], list):
            row = list(itertools.chain.from_iterable(row))
        flat.append(row)
    return flat


NPY_POINTS = "<application/x-npy body>"
"""Where a request sent as .npy (`service.middleware.NpyBody`) had its array: the points field
holds this marker and the decoded (n, dim) float32 array waits in `npy_points`."""
npy_points: ContextVar[np.ndarray | None] = ContextVar("npy_points", default=None)


def _points_from_npy(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    if isinstance(value, str) and value == NPY_POINTS:
        array = npy_points.get()
        if array is not None:
            return array  # decoded, finite and flattened by the middleware
    return handler(value)


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# minItems only documents what `_check_rows` enforces, with its messages.
Point = Annotated[list[FiniteFloat], Field(json_schema_extra={"minItems": 1})]
Points = Annotated[
    list[Point],
    BeforeValidator(_flatten_rows),
    WrapValidator(_points_from_npy),
    Field(json_schema_extra={"minItems": 1}),
]
_VECTOR = TypeAdapter(list[FiniteFloat])
_VECTORS = TypeAdapter(list[list[FiniteFloat]])

_LABEL_SCHEMA = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]}
Labels = Annotated[
    Any,
    WithJsonSchema(
        {
            "anyOf": [
                *_LABEL_SCHEMA["anyOf"],
                {"type": "array", "items": _LABEL_SCHEMA, "minItems": 1},
                {"type": "null"},
            ],
            "description": "Class-conditional models: one class (index or name from the "
            "manifest's classes) for every row, or a list with one per row. Left out: the null "
            "class where the model has one.",
            "examples": [3, "7", [0, 1, 2, 3]],
        }
    ),
]
ConditionVectors = Annotated[
    Any,
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "array", "items": {"type": "number"}, "minItems": 1},
                {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "number"}, "minItems": 1},
                    "minItems": 1,
                },
                {"type": "null"},
            ],
            "description": "Vector-conditional models: one vector of the manifest's condition "
            "width for every row, or a list with one per row. Left out: the null vector where "
            "the model has one.",
        }
    ),
]
GuidanceField = Annotated[
    float | None,
    Field(
        ge=0,
        allow_inf_nan=False,
        description="w of classifier-free guidance, v(t, x, null) + w (v(t, x, c) - "
        "v(t, x, null)); default the manifest's guidance_scale, else 1. w != 1 costs two "
        "evaluations per stage and needs a model with a null condition.",
    ),
]
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


def _check_rows(points: list[list[float]] | np.ndarray | None, field: str) -> None:
    if points is None or isinstance(points, np.ndarray):
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


def _check_labels(value: Any) -> None:
    """labels: an index (not a bool), a name, or a non-empty list of them; the model decides
    which indices and names exist."""
    if value is None:
        return
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise ValueError("labels: must hold at least one label")
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, int | str):
            where = f"labels[{i}]" if isinstance(value, list) else "labels"
            raise ValueError(f"{where}: expected a class index or a class name, got {item!r}")
        if isinstance(item, int) and item < 0:
            where = f"labels[{i}]" if isinstance(value, list) else "labels"
            raise ValueError(f"{where}: a class index is >= 0, got {item}")


def _check_condition(value: Any) -> list[float] | list[list[float]] | None:
    """condition: one finite vector, or one per row of the same width."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValueError("condition: expected a vector (a list of numbers) or one per row")
    adapter = _VECTORS if isinstance(value[0], list) else _VECTOR
    try:
        parsed = adapter.validate_python(value, strict=True)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = "".join(f"[{part}]" for part in error["loc"])
        raise ValueError(f"condition{where}: {error['msg']}") from None
    if adapter is _VECTORS:
        _check_rows(parsed, "condition")
    return parsed


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Conditioned(_Request):
    """The optional fields of conditional models, shared by every POST endpoint."""

    labels: Labels = None
    condition: ConditionVectors = None
    guidance_scale: GuidanceField = None

    @model_validator(mode="after")
    def _check_conditioning(self) -> _Conditioned:
        _check_labels(self.labels)
        self.condition = _check_condition(self.condition)
        if self.labels is not None and self.condition is not None:
            raise ValueError("labels: give labels (class models) or condition (vector models)")
        return self


class SampleRequest(_Conditioned):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "four-gaussians", "num_samples": 4, "num_steps": 100, "seed": 7},
                {
                    "model": "digits",
                    "num_samples": 10,
                    "labels": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
                    "guidance_scale": 1.5,
                    "num_steps": 50,
                    "seed": 7,
                },
            ]
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
                },
                {"model": "digits", "num_samples": 3, "labels": "7", "num_steps": 10, "stride": 5},
            ]
        }
    )

    stride: int = Field(1, ge=1, description="Keep every stride-th state; the last is always kept.")

    @model_validator(mode="after")
    def _check_stride(self) -> TrajectoryRequest:
        if self.stride > self.num_steps:
            raise ValueError(f"stride: {self.stride} is larger than num_steps ({self.num_steps})")
        return self


class EncodeRequest(_Conditioned):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "four-gaussians", "x": [[4.0, 4.0], [-4.0, 3.5]], "num_steps": 100},
                {"model": "digits", "x": [[-1.0] * 64], "labels": 3, "guidance_scale": 1.0},
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


class VelocityRequest(_Conditioned):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "four-gaussians", "t": 0.5, "x": [[0.0, 0.0], [2.0, 2.0]]},
                {"model": "digits", "t": 0.9, "x": [[0.0] * 64], "labels": 3},
            ]
        }
    )

    model: ModelField = None
    t: float = Field(ge=0.0, le=1.0, description="The time at which the field is evaluated.")
    x: Points = Field(description="Points (n, dim) at which the field is evaluated.")
    timeout_s: TimeoutField = None

    @model_validator(mode="after")
    def _check(self) -> VelocityRequest:
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
                },
                {
                    "model": "digits",
                    "x": [[-1.0] * 64],
                    "labels": 3,
                    "divergence": "hutchinson",
                    "num_probes": 16,
                    "seed": 1,
                },
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
    nfe: int = Field(
        description="Network evaluations per point: num_steps x solver stages, twice that "
        "with guidance (w != 1)."
    )
    shape: list[int] | None = Field(
        None, description="Shape of one sample, for models whose manifest gives one."
    )
    labels: list[int] | None = Field(
        None, description="Class-conditional models: the class index of every row."
    )
    condition: list[float] | list[list[float]] | None = Field(
        None, description="Vector-conditional models: the condition, as sent (or the null)."
    )
    guidance_scale: float | None = Field(
        None, description="Conditional models: the w the answer was integrated with."
    )


class _Seeded(_Answer):
    seed: int | None = Field(description="The seed of the start points; null when x0 was given.")


class SampleResponse(_Seeded):
    samples: list[Any] = Field(description="(num_samples, *shape): rows of dim numbers, nested.")


class TrajectoryResponse(_Seeded):
    stride: int
    times: list[float]
    trajectory: list[Any] = Field(description="(len(times), num_samples, *shape), nested.")


class EncodeResponse(_Answer):
    latents: list[Any] = Field(description="(n, *shape), nested.")


class VelocityResponse(BaseModel):
    model: str
    num_samples: int
    dim: int
    t: float
    nfe: int = Field(description="Network evaluations per point: 1, or 2 with guidance (w != 1).")
    shape: list[int] | None = None
    labels: list[int] | None = None
    condition: list[float] | list[list[float]] | None = None
    guidance_scale: float | None = None
    velocity: list[Any] = Field(description="(n, *shape): v(t, x) at each point, nested.")


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
    latents: list[Any] = Field(description="(n, *shape), nested.")


class ErrorResponse(BaseModel):
    detail: str


class RefusedModel(BaseModel):
    name: str
    reason: str


class ModelsResponse(BaseModel):
    models: list[dict[str, Any]]
    refused: list[RefusedModel] | None = Field(
        None, description="Folders that were not loaded, and why (with FLOW_SERVE_PARTIAL)."
    )


class HealthResponse(BaseModel):
    status: str
    models: list[str] | None = None
    refused: dict[str, str] | None = Field(
        None, description="Refused folder -> why (only with FLOW_SERVE_PARTIAL)."
    )
