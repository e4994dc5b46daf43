"""Graph rewrites that make any loaded velocity model faster without changing its numbers.

Each rewrite works on the TorchScript graph, not on our exporter's classes, so models built
elsewhere benefit too:

- `freeze`: inline parameters as constants (`torch.jit.freeze`), which the rewrites below need.
- `elu`: writes elu as relu(x) + (exp(min(x, 0)) - 1) (the general form with alpha, scale and
  input_scale, then multiplications by a constant 1 dropped). On CPUs whose `elu` kernel is
  slow this pays; where it is vectorised it costs extra memory passes, so it is off by default:
  `python -m bench.fastpath` measures both on the machine at hand.
- `time_fold`: `linear(cat([x, t], -1), W, b)` becomes `linear(x, W_x, b) + t * w_t`, which
  skips building the concatenated input on every pass. For low-dimensional x the saved copy is
  small against the extra elementwise pass, so it is off by default too.
- `onednn` (on by default, CPU only): runs the graph through PyTorch's oneDNN Graph fuser, which
  hands chains such as linear -> bias -> elu to oneDNN as one kernel (its own vectorised exp, no
  trip through memory between the matmul and the activation). A pass of the 3 x 64 ELU network
  gets 1.7-1.8x faster from 256 rows up; a SiLU one 0.84x as fast. So the fused graph is timed
  against the unfused one and kept only when it pays, and the unfused copy is kept for small
  passes, where the fused kernels' per-call cost outweighs their gain. The switch is
  process-wide (`torch.jit` has no per-module one): the first model that fuses turns it on, and
  a model whose output it would change turns it off for the models loaded after it.

  A fused graph is specialised to the row counts it has run: each new one is compiled (about
  7 ms) and adds a guard every later call checks, and past a dozen the graph runs unfused, slower
  than the unfused copy (a 1,008-row pass of the network above: 0.45-0.50 ms against 0.19 ms
  planned). So the service plans one fused copy per row count of `row_buckets` (powers of two)
  at load, each checked like the rest, and runs every pass on them (`field.bucket_plan`).

Every rewrite is applied to a copy and checked against the graph as loaded on a probe input (the
field's own seeded example, so conditional and shaped models are checked with their own
arguments); one that fails or changes the output beyond float32 noise is dropped and logged, and
the next one is tried on the last good graph.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from service.errors import one_line
from service.field import Signature, VelocityField

log = logging.getLogger("flowserve.fastpath")

REWRITES = ("freeze", "elu", "time_fold", "onednn")
DEFAULT_REWRITES = ("freeze", "onednn")
FUSION_GROUP = "prim::oneDNNFusionGroup"
# Rows of the probes the fused graph is checked on: oneDNN picks its kernel by row count, so a
# small and a blocked size are both tried; the last one is also timed.
FUSION_PROBE_ROWS = (257, 4099)
# The fused graph is kept only when it is at least this much faster on the timed probe.
MIN_SPEEDUP = 1.05
TIMING_REPS = 7
LARGEST_BUCKET = 16_384
"""The largest row count a fused copy is planned for; larger passes run as several calls."""
ATOL = 1e-5
RTOL = 1e-4

_ELU = """
graph(%x, %alpha, %scale, %input_scale):
  %r = aten::elu(%x, %alpha, %scale, %input_scale)
  return (%r)"""

_ELU_AS_EXP = """
graph(%x, %alpha, %scale, %input_scale):
  %none : NoneType = prim::Constant()
  %zero : float = prim::Constant[value=0.]()
  %one : int = prim::Constant[value=1]()
  %negative : Tensor = aten::clamp(%x, %none, %zero)
  %scaled : Tensor = aten::mul(%negative, %input_scale)
  %exp : Tensor = aten::exp(%scaled)
  %expm1 : Tensor = aten::sub(%exp, %one, %one)
  %left : Tensor = aten::mul(%expm1, %alpha)
  %right : Tensor = aten::relu(%x)
  %sum : Tensor = aten::add(%left, %right, %one)
  %r : Tensor = aten::mul(%sum, %scale)
  return (%r)"""


def _constant(value: torch._C.Value):
    node = value.node()
    return value.toIValue() if node.kind() == "prim::Constant" else None


def _rewrite_elu(graph: torch._C.Graph, _signature: Signature) -> bool:
    if not graph.findAllNodes("aten::elu"):
        return False
    torch._C._jit_pass_custom_pattern_based_rewrite_graph(_ELU, _ELU_AS_EXP, graph)
    for node in graph.findAllNodes("aten::mul"):
        factor = node.inputsAt(1)
        if factor.type().kind() in ("IntType", "FloatType") and _constant(factor) == 1:
            node.output().replaceAllUsesWith(node.inputsAt(0))
            node.destroy()
    torch._C._jit_pass_dce(graph)
    return True


def _rewrite_time_fold(graph: torch._C.Graph, signature: Signature) -> bool:
    """Fold the time column of `linear(cat([x, t], -1), W, b)` out of the first layer."""
    inputs = list(graph.inputs())
    if signature.time_shape != (-1, 1) or len(inputs) != len(signature.inputs) + 1:
        return False
    dim = signature.dim
    t_in = inputs[1 + signature.inputs.index("t")]
    x_in = inputs[1 + signature.inputs.index("x")]
    folded = False
    for cat in graph.findAllNodes("aten::cat"):
        parts = cat.inputsAt(0).node()
        axis = _constant(cat.inputsAt(1))
        uses = cat.output().uses()
        if parts.kind() != "prim::ListConstruct" or axis not in (-1, 1) or len(uses) != 1:
            continue
        order = [value.unique() for value in parts.inputs()]
        x_first = order == [x_in.unique(), t_in.unique()]
        if not x_first and order != [t_in.unique(), x_in.unique()]:
            continue
        linear = uses[0].user
        if linear.kind() != "aten::linear":
            continue
        weight, bias = _constant(linear.inputsAt(1)), linear.inputsAt(2)
        if not isinstance(weight, torch.Tensor) or weight.shape[-1] != dim + 1:
            continue
        time_column = dim if x_first else 0
        x_columns = slice(0, dim) if x_first else slice(1, dim + 1)
        with graph.insert_point_guard(linear):
            w_x = graph.insertConstant(weight[:, x_columns].contiguous())
            w_t = graph.insertConstant(weight[:, time_column].contiguous())
            hidden = graph.insert("aten::linear", [x_in, w_x, bias])
            out = graph.insert("aten::addcmul", [hidden, t_in, w_t])
        linear.output().replaceAllUsesWith(out)
        folded = True
    torch._C._jit_pass_dce(graph)
    return folded


_GRAPH_REWRITES: dict[str, Callable[[torch._C.Graph, Signature], bool]] = {
    "elu": _rewrite_elu,
    "time_fold": _rewrite_time_fold,
}


class Optimized(NamedTuple):
    """What `optimize` chose for a model.

    module: the fastest verified graph. unfused: the same graph with plans built without the
    oneDNN fuser, or None when `module` is not fused; the fused kernels cost about 15 us more
    per call, so passes of a few rows are faster on this one. planned: fused copies of `module`
    by the one row count each was planned and checked for (the `buckets` asked for), or None.
    """

    module: torch.jit.ScriptModule
    applied: list[str]
    unfused: torch.jit.ScriptModule | None = None
    planned: dict[int, torch.jit.ScriptModule] | None = None


def row_buckets(min_rows: int, largest: int = LARGEST_BUCKET) -> tuple[int, ...]:
    """The row counts fused copies are planned for: the powers of two from `min_rows` (the
    fewest rows a pass runs fused; 16 at least) up to `largest`."""
    first = max(16, 1 << max(0, min_rows - 1).bit_length())
    return tuple(1 << k for k in range(first.bit_length() - 1, largest.bit_length()))


def optimize(
    field: VelocityField,
    rewrites: tuple[str, ...] = DEFAULT_REWRITES,
    buckets: tuple[int, ...] = (),
) -> Optimized:
    """Return the fastest verified equivalent of `field.graph` (the graph as loaded) and the names
    of the rewrites applied; when it is fused, also a copy of it planned for each row count of
    `buckets`.

    Call it before any engine runs: the oneDNN check flips torch's process-wide fuser switch.
    """
    module = field.graph
    if "freeze" not in rewrites:
        return Optimized(module, [])
    try:
        best = torch.jit.freeze(module.eval())
    except Exception as exc:  # a module freeze cannot handle is still served as it is
        log.warning("graph rewrites skipped: freeze failed: %s", one_line(exc))
        return Optimized(module, [])
    if not _agrees(field, best):
        log.warning("graph rewrites skipped: the frozen graph differs from the loaded one")
        return Optimized(module, [])
    applied = ["freeze"]
    for name in rewrites:
        if name not in _GRAPH_REWRITES:
            continue
        candidate = _rewritten(field, applied)
        try:
            changed = _GRAPH_REWRITES[name](candidate.graph, field.signature)
        except Exception as exc:
            log.warning("graph rewrite %s skipped: %s", name, one_line(exc))
            continue
        if not changed:
            continue
        if not _agrees(field, candidate):
            log.warning("graph rewrite %s skipped: output differs from the loaded graph", name)
            continue
        best = candidate
        applied.append(name)
    device = field.device
    if "onednn" not in rewrites or device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return Optimized(best, applied)
    # Plans are built on a graph's first calls and kept, so each copy gets its plan built
    # under the switch it is meant to run with, and `best` (whose plan may be either) is dropped.
    was_on = torch._C._jit_llga_enabled()
    probes = [_probe(field, rows) for rows in FUSION_PROBE_ROWS]
    torch.jit.enable_onednn_fusion(False)
    unfused = _rewritten(field, applied)
    unfused_field = field.with_graphs(unfused)
    expected = [_run_until_planned(unfused_field, probe)[0] for probe in probes]
    bucket_probes = {rows: _probe(field, rows) for rows in buckets}
    with torch.no_grad():
        by_bucket = {rows: unfused_field(*probe) for rows, probe in bucket_probes.items()}
    torch.jit.enable_onednn_fusion(True)
    fused = _rewritten(field, applied)
    _concat_in_aten(fused.graph, field.signature)
    try:
        runs = [_run_until_planned(field.with_graphs(fused), probe) for probe in probes]
    except Exception as exc:
        log.warning("graph rewrite onednn skipped: %s", one_line(exc))
        runs = []
    if not runs or not all(planned for _, planned in runs):  # nothing the fuser could take
        torch.jit.enable_onednn_fusion(was_on)
        return Optimized(unfused, applied)
    if not all(_close(got, want) for (got, _), want in zip(runs, expected, strict=True)):
        log.warning(
            "graph rewrite onednn skipped: output differs from the unfused graph; "
            "the fuser stays off for models loaded from now on"
        )
        torch.jit.enable_onednn_fusion(False)
        return Optimized(unfused, applied)
    probe = probes[-1]
    speedup = _speedup(field.with_graphs(fused), field.with_graphs(unfused), probe)
    rows = probe[1].shape[0]
    if speedup < MIN_SPEEDUP:
        log.info(
            "graph rewrite onednn skipped: the fused graph is not faster (%.2fx at %d rows)",
            speedup,
            rows,
        )
        torch.jit.enable_onednn_fusion(was_on)
        return Optimized(unfused, applied)
    planned = {}
    for bucket, want in by_bucket.items():
        copy = _rewritten(field, applied)
        _concat_in_aten(copy.graph, field.signature)
        got, _ = _run_until_planned(field.with_graphs(copy), bucket_probes[bucket])
        if not _close(got, want):
            log.warning(
                "graph rewrite onednn skipped: output differs from the unfused graph at %d "
                "rows; the fuser stays off for models loaded from now on",
                bucket,
            )
            torch.jit.enable_onednn_fusion(False)
            return Optimized(unfused, applied)
        planned[bucket] = copy
    log.info("graph rewrite onednn: %.2fx faster at %d rows", speedup, rows)
    return Optimized(fused, [*applied, "onednn"], unfused, planned or None)


def _concat_in_aten(graph: torch._C.Graph, signature: Signature) -> None:
    """Leave concatenations along dim 1 to ATen: the fuser makes a oneDNN concat of them, which
    for a few narrow columns such as [x, t] costs more than the rest of the first layer (a pass
    is 1.05-1.10x faster without it). `hstack` is `cat` along dim 1 for tensors of rank 2 and
    up, and the fuser does not take it. Dim -1 is dim 1 only for rank 2, so it is rewritten only
    for the graph's own rank-2 inputs: t of time shape (B, 1), a flat x, a vector condition."""
    rank2 = {"t": signature.time_shape == (-1, 1), "x": signature.shape == (signature.dim,)}
    rank2["c"] = signature.condition is not None and signature.condition.kind == "vector"
    values = list(graph.inputs())[1:]
    own_inputs = {
        value.unique() for value, name in zip(values, signature.inputs, strict=False) if rank2[name]
    }
    for cat in graph.findAllNodes("aten::cat"):
        parts = cat.inputsAt(0).node()
        axis = _constant(cat.inputsAt(1))
        inputs_only = parts.kind() == "prim::ListConstruct" and all(
            value.unique() in own_inputs for value in parts.inputs()
        )
        if axis == 1 or (axis == -1 and inputs_only):
            with graph.insert_point_guard(cat):
                stacked = graph.insert("aten::hstack", [cat.inputsAt(0)])
            cat.output().replaceAllUsesWith(stacked)
            cat.destroy()


Probe = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""(t, x, c) in the field's flat form."""


def _speedup(fused: VelocityField, unfused: VelocityField, probe: Probe) -> float:
    """Best time of `unfused` over best time of `fused` on the probe; calls alternate, so a busy
    machine slows both alike."""
    best = [float("inf"), float("inf")]
    with torch.no_grad():
        for _ in range(TIMING_REPS):
            for i, field in enumerate((fused, unfused)):
                start = time.perf_counter()
                field(*probe)
                best[i] = min(best[i], time.perf_counter() - start)
    return best[1] / best[0]


def _rewritten(field: VelocityField, applied: list[str]) -> torch.jit.ScriptModule:
    """A fresh frozen copy of the loaded graph (its own graph executor), `applied` rewrites done."""
    candidate = torch.jit.freeze(field.graph.eval())
    for done in applied[1:]:
        _GRAPH_REWRITES[done](candidate.graph, field.signature)
    return candidate


def _run_until_planned(field: VelocityField, probe: Probe) -> tuple[torch.Tensor, bool]:
    """(output of the optimised plan, whether that plan holds oneDNN fusion groups).

    The profiling executor runs a graph's first call as is and builds its plan on the next.
    """
    with torch.no_grad():
        for _ in range(3):
            out = field(*probe)
    return out, FUSION_GROUP in str(torch.jit.last_executed_optimized_graph())


def _agrees(field: VelocityField, candidate: torch.jit.ScriptModule, rows: int = 257) -> bool:
    probe = _probe(field, rows)
    with torch.no_grad():
        expected = field(*probe)
        try:
            got = field.with_graphs(candidate)(*probe)
        except Exception:
            return False
    return _close(got, expected)


def _probe(field: VelocityField, rows: int) -> Probe:
    """t in [0, 1), x spread wider than a unit source, every class or random vectors; seeded."""
    return field.example(rows, seed=1, spread=3.0)


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=RTOL, atol=ATOL)
