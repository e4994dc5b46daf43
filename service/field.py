"""The velocity field as the service sees it: the one object that calls the network.

A served network is any TorchScript module; its manifest says how to call it (`Signature`): the
argument order (`inputs`), the shape of the time argument, the shape of one sample, and the
condition it reads, if any. The engine, the solvers and the likelihood code all work on flat
rows, x of shape (n, dim), with t of shape (n, 1) and a condition as float columns (n, width);
`VelocityField` turns those into the model's own arguments, picks the graph copy for the pass
(fused for large passes, unfused for small ones, the graph as loaded when the pass
differentiates), checks what comes back, and applies classifier-free guidance:

    v_w(t, x, c) = v(t, x, null) + w (v(t, x, c) - v(t, x, null))

with the conditional and the null evaluation of every guided row in one network call.
"""

from __future__ import annotations

import bisect
import functools
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from service.errors import ModelFailed

INPUT_ORDERS: tuple[tuple[str, ...], ...] = (
    ("t", "x"),
    ("x", "t"),
    ("t", "x", "c"),
    ("x", "t", "c"),
)
TIME_SHAPES: tuple[tuple[int, ...], ...] = ((-1, 1), (-1,))
CONDITION_KINDS = ("class", "vector")

Graph = Callable[..., Any]
"""A TorchScript module, its bound `forward`, or any callable with the model's signature."""


@dataclass(frozen=True)
class Condition:
    """What a conditional model reads as c.

    kind "class": c is int64 (B,), an index into `classes`; `null` (optional) is the index the
    network reads as "no condition". kind "vector": c is float32 (B, width); `null` (optional) is
    the vector read as "no condition". In the engine's lanes either is `width` float columns.
    """

    kind: str
    width: int
    classes: tuple[str, ...] = ()
    null: tuple[float, ...] | None = None

    @property
    def has_null(self) -> bool:
        return self.null is not None

    def spec(self) -> dict[str, Any]:
        """The manifest's form."""
        if self.kind == "class":
            spec: dict[str, Any] = {"kind": "class", "classes": list(self.classes)}
            if self.null is not None:
                spec["null"] = int(self.null[0])
            return spec
        spec = {"kind": "vector", "dim": self.width}
        if self.null is not None:
            spec["null"] = list(self.null)
        return spec

    @classmethod
    def from_spec(cls, spec: Any, field: str = "condition") -> Condition:
        """Validate the manifest's `condition`; ValueError naming `field.<key>`."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"{field}: expected an object with a kind")
        kind = spec.get("kind")
        if kind == "class":
            _known_keys(spec, field, {"kind", "classes", "null"})
            classes = spec.get("classes")
            if (
                not isinstance(classes, list)
                or not classes
                or not all(isinstance(c, str) and c for c in classes)
            ):
                raise ValueError(f"{field}.classes: expected a non-empty list of names")
            if len(set(classes)) != len(classes):
                raise ValueError(f"{field}.classes: names must be unique")
            null = spec.get("null")
            if null is not None and (
                isinstance(null, bool) or not isinstance(null, int) or null < 0 or null >= 2**24
            ):
                raise ValueError(f"{field}.null: expected a class index >= 0, got {null!r}")
            return cls("class", 1, tuple(classes), None if null is None else (float(null),))
        if kind == "vector":
            _known_keys(spec, field, {"kind", "dim", "null"})
            width = spec.get("dim")
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(f"{field}.dim: expected a positive integer, got {width!r}")
            null = spec.get("null")
            if null is not None:
                if (
                    not isinstance(null, list)
                    or len(null) != width
                    or not all(_finite_number(v) for v in null)
                ):
                    raise ValueError(f"{field}.null: expected {width} finite numbers")
                null = tuple(float(v) for v in null)
            return cls("vector", width, (), null)
        raise ValueError(
            f"{field}.kind: expected one of {', '.join(CONDITION_KINDS)}, got {kind!r}"
        )


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _known_keys(spec: Mapping, field: str, known: set[str]) -> None:
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{field}: unknown field(s) {', '.join(unknown)}")


def _int_list(value: Any, field: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{field}: expected a non-empty list of integers, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{field}: expected a non-empty list of integers, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Signature:
    """How to call a model: what the manifest's optional fields say, with their defaults.

    shape: one sample's shape, product `dim`; the model receives x as (B, *shape).
    inputs: the order of forward's arguments. time_shape: (-1, 1) for t (B, 1), (-1,) for (B,).
    condition: None for an unconditional model.
    """

    dim: int
    shape: tuple[int, ...]
    inputs: tuple[str, ...] = ("t", "x")
    time_shape: tuple[int, ...] = (-1, 1)
    condition: Condition | None = None

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Signature:
        """Read `dim` and the optional fields; ValueError naming the field and what is wrong."""
        dim = manifest["dim"]
        shape = (dim,)
        if manifest.get("shape") is not None:
            shape = _int_list(manifest["shape"], "shape")
            if any(s < 1 for s in shape):
                raise ValueError(f"shape: sizes must be positive, got {list(shape)}")
            if math.prod(shape) != dim:
                raise ValueError(
                    f"shape: {list(shape)} holds {math.prod(shape)} values, dim is {dim}"
                )
        inputs = ("t", "x")
        if manifest.get("inputs") is not None:
            raw = manifest["inputs"]
            inputs = tuple(raw) if isinstance(raw, list) else ()
            if inputs not in INPUT_ORDERS:
                choices = " or ".join(str(list(order)).replace("'", '"') for order in INPUT_ORDERS)
                raise ValueError(f"inputs: expected {choices}, got {raw!r}")
        time_shape = (-1, 1)
        if manifest.get("time_shape") is not None:
            time_shape = _int_list(manifest["time_shape"], "time_shape")
            if time_shape not in TIME_SHAPES:
                raise ValueError(f"time_shape: expected [-1, 1] or [-1], got {list(time_shape)}")
        condition = None
        if manifest.get("condition") is not None:
            condition = Condition.from_spec(manifest["condition"])
        if (condition is not None) != ("c" in inputs):
            if condition is None:
                raise ValueError('inputs: lists "c" but the manifest has no condition')
            raise ValueError('inputs: a model with a condition must list "c"')
        return cls(dim, shape, inputs, time_shape, condition)

    def manifest_fields(self) -> dict[str, Any]:
        """The optional manifest fields that differ from their defaults."""
        fields: dict[str, Any] = {}
        if self.shape != (self.dim,):
            fields["shape"] = list(self.shape)
        if self.inputs != ("t", "x"):
            fields["inputs"] = list(self.inputs)
        if self.time_shape != (-1, 1):
            fields["time_shape"] = list(self.time_shape)
        if self.condition is not None:
            fields["condition"] = self.condition.spec()
        return fields

    @property
    def call(self) -> str:
        """How the docs and messages write the call: "forward(t, x)"."""
        return f"forward({', '.join(self.inputs)})"


CALL_ROWS = 128
"""What one more call of a planned graph costs, counted in rows: about 20 us against 0.18 us a
row for the 3 x 64 ELU network on one CPU thread. A pass on graphs planned for a few row counts
runs as one padded call or as several, whichever costs fewer rows counting this much a call."""


@functools.lru_cache(maxsize=4096)
def bucket_plan(rows: int, buckets: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """How `rows` rows run on graphs planned for the row counts `buckets` (ascending) only:
    pieces (rows taken, bucket run), in order, each piece's rows padded up to its bucket. For
    buckets that are powers of two (`fastpath.row_buckets`), the plan puts the fewest rows
    through the network, counting CALL_ROWS for each call."""
    largest = buckets[-1]
    whole, rows = divmod(rows, largest)
    pieces = ((largest, largest),) * whole
    if rows:
        pieces += _cheapest(rows, buckets)[1]
    return pieces


@functools.lru_cache(maxsize=4096)
def _cheapest(rows: int, buckets: tuple[int, ...]) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(cost, pieces) of the cheapest plan for 0 < `rows` <= buckets[-1]: pad it up to the
    next bucket, or run the largest bucket it fills and plan the rest."""
    at = bisect.bisect_left(buckets, rows)
    up = buckets[at]
    best = (up + CALL_ROWS, ((rows, up),))
    if up != rows and at > 0:
        down = buckets[at - 1]
        cost, rest = _cheapest(rows - down, buckets)
        if down + CALL_ROWS + cost < best[0]:
            best = (down + CALL_ROWS + cost, ((down, down), *rest))
    return best


class _Padding(threading.local):
    """Each thread's input buffers for padded calls, by (row count, argument, dtype, trailing
    shape, device): a padded piece costs one copy into the head of its buffer. Rows past it keep
    what an earlier pass put there, or the first piece's last row: valid inputs of any model (a
    time, a point, a class), whose outputs are dropped."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def pad(self, value: torch.Tensor, rows: int, position: int) -> torch.Tensor:
        have = value.shape[0]
        if have == rows:
            return value
        key = (rows, position, value.dtype, value.shape[1:], value.device)
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = self.buffers[key] = value.new_empty((rows, *value.shape[1:]))
            buffer[have:] = value[have - 1]
        buffer[:have] = value
        return buffer


def _in_buckets(planned: Mapping[int, Graph]) -> Graph:
    """A graph that runs every pass on copies planned for fixed row counts (`planned`: row count
    -> graph copy), padding and splitting it as `bucket_plan` says.

    A TorchScript graph fused by oneDNN is specialised to the row counts it has seen: each new
    one costs a compilation and one more guard checked on every later call, and past a dozen
    the graph runs unfused and slower than the unfused copy. An engine's passes take every row
    count as requests come and go; this way each copy only ever sees its own."""
    buckets = tuple(sorted(planned))
    graphs = {rows: _bound(graph) for rows, graph in planned.items()}
    padding = _Padding()

    def run(*args: torch.Tensor) -> Any:
        rows = args[0].shape[0]
        plan = bucket_plan(rows, buckets)
        if len(plan) == 1 and plan[0][1] == rows:
            return graphs[rows](*args)
        outs = []
        start = 0
        for taken, bucket in plan:
            pieces = [padding.pad(a[start : start + taken], bucket, i) for i, a in enumerate(args)]
            out = graphs[bucket](*pieces)
            if type(out) is not torch.Tensor or out.shape[:1] != (bucket,):
                return out  # the caller's checks say what is wrong with it
            out = out[:taken]
            if any(out.data_ptr() == piece.data_ptr() for piece in pieces):
                out = out.clone()  # the model returned (a view of) its input: a reused buffer
            outs.append(out)
            start += taken
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    return run


def _bound(graph: Graph) -> Graph:
    # Calling the bound forward skips nn.Module's call machinery (a third of a small pass).
    forward = getattr(graph, "forward", None)
    return forward if callable(forward) else graph


class VelocityField:
    """v(t, x[, c]) of one served model, called on flat rows.

    graph: the graph for plain passes (fused when the fast path kept a fused copy). small: the
    graph for passes of fewer than `small_rows` rows (the unfused copy), default `graph`.
    planned: copies of `graph` by the one row count each was planned for; when given, plain
    passes of `small_rows` rows and more run on them (`_in_buckets`), not on `graph`.
    autograd: the graph as loaded, for passes that differentiate through it, default `graph`.
    device: where the model's inputs live.
    """

    def __init__(
        self,
        signature: Signature,
        graph: Graph,
        *,
        autograd: Graph | None = None,
        small: Graph | None = None,
        small_rows: int = 0,
        planned: Mapping[int, Graph] | None = None,
        device: torch.device | str = "cpu",
    ):
        self.signature = signature
        self.dim = signature.dim
        self.shape = signature.shape
        self.condition = signature.condition
        self.device = torch.device(device)
        self.graph = graph
        self.small = small
        self.autograd = autograd if autograd is not None else graph
        self.small_rows = small_rows
        self.planned = dict(planned or {})
        self._large = _in_buckets(self.planned) if self.planned else _bound(graph)
        self._small = _bound(small) if small is not None else self._large
        self._differentiable = _bound(self.autograd)
        self._flat = signature.shape == (signature.dim,)
        self._time_column = signature.time_shape == (-1, 1)
        self._plain_order = signature.inputs == ("t", "x")
        self._null: torch.Tensor | None = None
        if self.condition is not None and self.condition.null is not None:
            self._null = torch.tensor([self.condition.null], device=self.device)
        self.evaluate: Callable[..., torch.Tensor] = self._plain_pass
        if self._flat and self._time_column and self._plain_order and self.condition is None:
            self.evaluate = self._unconditional_pass()

    def with_graphs(
        self,
        graph: Graph,
        *,
        small: Graph | None = None,
        small_rows: int = 0,
        planned: Mapping[int, Graph] | None = None,
    ) -> VelocityField:
        """The same field with other graph copies for plain passes (the fast path's)."""
        return VelocityField(
            self.signature,
            graph,
            autograd=self.autograd,
            small=small,
            small_rows=small_rows,
            planned=planned,
            device=self.device,
        )

    # ------------------------------------------------------------------------- calls

    def __call__(
        self,
        t: torch.Tensor,
        x: torch.Tensor,
        c: torch.Tensor | None = None,
        w: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A plain pass. t: (n, 1); x: (n, dim); c: (n, width) float columns, or int64 (n,) for
        a class condition, None for an unconditional model; w: (n, 1) guidance scales, or None
        for v itself (w = 1, one evaluation). Returns (n, dim) float32.

        `evaluate` is the same function, without this method's indirection (the engine's)."""
        return self.evaluate(t, x, c, w)

    def _plain_pass(self, t, x, c=None, w=None) -> torch.Tensor:
        rows = x.shape[0] * (1 if w is None else 2)
        forward = self._large if rows >= self.small_rows else self._small
        return self._guided(forward, t, x, c, w)

    def _unconditional_pass(self) -> Callable[..., torch.Tensor]:
        """`_plain_pass` for the common signature, forward(t (B, 1), x (B, dim)): the model is
        called on the engine's own tensors, and a small pass (a few dozen us of network) pays
        one Python frame for it."""
        large, small, small_rows = self._large, self._small, self.small_rows
        describe, tensor, float32 = self._describe, torch.Tensor, torch.float32

        def evaluate(t, x, c=None, w=None):
            out = (large if x.shape[0] >= small_rows else small)(t, x)
            if out.__class__ is not tensor or out.shape != x.shape or out.dtype is not float32:
                raise ModelFailed(describe(out, x))
            return out

        return evaluate

    def differentiable(
        self,
        t: torch.Tensor,
        x: torch.Tensor,
        c: torch.Tensor | None = None,
        w: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As `__call__`, through the graph as loaded, so autograd can run back through it."""
        return self._guided(self._differentiable, t, x, c, w)

    def _guided(self, forward: Graph, t, x, c, w) -> torch.Tensor:
        if w is None:
            return self._evaluate(forward, t, x, c)
        if self._null is None:
            raise ValueError("guidance_scale: the model has no null condition")
        n = x.shape[0]
        c = self._columns(c, n)
        both = self._evaluate(
            forward,
            torch.cat([t, t]),
            torch.cat([x, x]),
            torch.cat([c, self._null.expand(n, -1)]),
        )
        conditional, unconditional = both[:n], both[n:]
        return torch.addcmul(unconditional, w, conditional - unconditional)

    def _columns(self, c: torch.Tensor | None, n: int) -> torch.Tensor:
        """c as (n, width) float columns, the lanes' form."""
        if c is None:
            raise ValueError("condition: the model needs one")
        if c.dim() == 1:
            return c.to(torch.float32).unsqueeze(1)
        return c

    def _evaluate(self, forward: Graph, t, x, c) -> torch.Tensor:
        n = x.shape[0]
        model_x = x if self._flat else x.reshape(n, *self.shape)
        if self._plain_order and self._time_column:
            out = forward(t, model_x)
        else:
            out = forward(*self.model_inputs(t, model_x, c))
        if (
            type(out) is not torch.Tensor
            or out.shape != model_x.shape
            or out.dtype != torch.float32
        ):
            raise ModelFailed(self._describe(out, model_x))
        return out if self._flat else out.reshape(n, self.dim)

    def model_inputs(
        self, t: torch.Tensor, x: torch.Tensor, c: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The model's own arguments, in its order: t as (B, 1) or (B,), x as (B, *shape), c as
        int64 (B,) (class) or float32 (B, k) (vector)."""
        n = x.shape[0]
        values = {
            "t": t if self._time_column else t.reshape(n),
            "x": x if x.dim() > 2 or self._flat else x.reshape(n, *self.shape),
        }
        if self.condition is not None:
            if c is None:
                raise ValueError("condition: the model needs one")
            if self.condition.kind == "class":
                values["c"] = c.reshape(n).to(torch.int64)
            else:
                values["c"] = c
        return tuple(values[name] for name in self.signature.inputs)

    def _describe(self, out: Any, x: torch.Tensor) -> str:
        call = self.signature.call
        if type(out) is not torch.Tensor:
            return f"{call} returned {type(out).__name__}, expected a tensor"
        if out.shape != x.shape:
            return f"{call} returned {tuple(out.shape)} for x of shape {tuple(x.shape)}"
        return f"{call} returned {out.dtype}, expected torch.float32"

    # ------------------------------------------------------------------------- probes

    def example(
        self, rows: int, seed: int = 0, spread: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Seeded inputs in the engine's form: t (rows, 1) in [0, 1), x (rows, dim) of std
        `spread`, c (rows, width) (every class, or standard normal vectors) or None."""
        generator = torch.Generator().manual_seed(seed)
        t = torch.rand(rows, 1, generator=generator)
        x = spread * torch.randn(rows, self.dim, generator=generator)
        c = None
        if self.condition is not None:
            if self.condition.kind == "class":
                count = len(self.condition.classes)
                c = (torch.arange(rows) % count).to(torch.float32).unsqueeze(1)
            else:
                c = torch.randn(rows, self.condition.width, generator=generator)
        move = lambda v: None if v is None else v.to(self.device)  # noqa: E731
        return move(t), move(x), move(c)

    def example_inputs(self, rows: int, seed: int = 0, spread: float = 1.0) -> tuple:
        """`example` as the model's own arguments (what a graph rewrite is checked on)."""
        return self.model_inputs(*self.example(rows, seed, spread))
