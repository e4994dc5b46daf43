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

Every rewrite is applied to a copy and checked against the graph as loaded on a probe input; one
that fails or changes the output beyond float32 noise is dropped and logged, and the next one is
tried on the last good graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("flowserve.fastpath")

REWRITES = ("freeze", "elu", "time_fold")
DEFAULT_REWRITES = ("freeze",)
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


def _rewrite_elu(graph: torch._C.Graph, _dim: int) -> bool:
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


def _rewrite_time_fold(graph: torch._C.Graph, dim: int) -> bool:
    """Fold the time column of `linear(cat([x, t], -1), W, b)` out of the first layer."""
    inputs = list(graph.inputs())
    if len(inputs) != 3:
        return False
    t_in, x_in = inputs[1], inputs[2]
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


_GRAPH_REWRITES: dict[str, Callable[[torch._C.Graph, int], bool]] = {
    "elu": _rewrite_elu,
    "time_fold": _rewrite_time_fold,
}


def optimize(
    module: torch.jit.ScriptModule,
    dim: int,
    device: torch.device,
    rewrites: tuple[str, ...] = DEFAULT_REWRITES,
) -> tuple[torch.jit.ScriptModule, list[str]]:
    """Return (the fastest verified equivalent of `module`, names of the rewrites applied)."""
    if "freeze" not in rewrites:
        return module, []
    try:
        best = torch.jit.freeze(module.eval())
    except Exception as exc:  # a module freeze cannot handle is still served as it is
        log.warning("graph rewrites skipped: freeze failed: %s", str(exc).splitlines()[0])
        return module, []
    if not _agrees(module, best, dim, device):
        log.warning("graph rewrites skipped: the frozen graph differs from the loaded one")
        return module, []
    applied = ["freeze"]
    for name in rewrites:
        if name == "freeze":
            continue
        candidate = torch.jit.freeze(module.eval())
        try:
            for done in applied[1:]:
                _GRAPH_REWRITES[done](candidate.graph, dim)
            changed = _GRAPH_REWRITES[name](candidate.graph, dim)
        except Exception as exc:
            log.warning("graph rewrite %s skipped: %s", name, str(exc).splitlines()[0])
            continue
        if not changed:
            continue
        if not _agrees(module, candidate, dim, device):
            log.warning("graph rewrite %s skipped: output differs from the loaded graph", name)
            continue
        best = candidate
        applied.append(name)
    return best, applied


def _agrees(
    reference: torch.jit.ScriptModule,
    candidate: torch.jit.ScriptModule,
    dim: int,
    device: torch.device,
    rows: int = 257,
) -> bool:
    generator = torch.Generator().manual_seed(1)
    t = torch.rand(rows, 1, generator=generator).to(device)
    x = (3 * torch.randn(rows, dim, generator=generator)).to(device)
    with torch.inference_mode():
        expected = reference(t, x)
        try:
            got = candidate(t, x)
        except Exception:
            return False
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=RTOL, atol=ATOL)
