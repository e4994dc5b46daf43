"""Graph rewrites: each one applies to graphs of the right shape, keeps the numbers, and is
dropped (with a log line) when it would change them."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import PostFlow

from service import fastpath
from service.fastpath import optimize as optimize_field
from service.field import Signature, VelocityField

CPU = torch.device("cpu")
TIMER = fastpath._speedup  # the real one; the fixture below stands in for it


class TimeFirst(torch.nn.Module):
    """cat([t, x]) order, a non-default elu alpha, and a second layer."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(dim + 1, 8)
        self.outer = torch.nn.Linear(8, dim)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.nn.functional.elu(self.inner(torch.cat((t, x), 1)), alpha=0.7)
        return self.outer(hidden)


class NoConcat(torch.nn.Module):
    """No concatenation, no elu, and nothing oneDNN fuses (it has no sine)."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * t


class InnerConcat(torch.nn.Module):
    """Concatenations along dim 1 of the inputs, and along dim -1 of inner (rank-2) values."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(dim + 1, 8)
        self.outer = torch.nn.Linear(16, dim)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.inner(torch.cat([t, x], 1)))
        return self.outer(torch.cat([hidden, -hidden], -1))


def optimize(module, dim: int, rewrites=fastpath.DEFAULT_REWRITES):
    """`fastpath.optimize` on the field of a plain (t, x) model of dimension `dim`: (graph,
    rewrites applied, unfused copy)."""
    fast = optimize_field(VelocityField(Signature(dim, (dim,)), module), rewrites)
    assert fast.planned is None  # no row counts asked for
    return fast.module, fast.applied, fast.unfused


@pytest.fixture(autouse=True)
def restore_fuser_switch(monkeypatch):
    """The oneDNN fuser switch is process-wide: start each test with it off and leave it as the
    test found it. Whether fusion pays is timed; here a stand-in timer says it does, so the
    outcome is the same on any machine (the tests of that decision set their own)."""
    monkeypatch.setattr(fastpath, "_speedup", lambda *_: 2.0)
    was_on = torch._C._jit_llga_enabled()
    # Each test starts with the fuser off, whatever an earlier test (a loaded model) left.
    torch.jit.enable_onednn_fusion(False)
    yield
    torch.jit.enable_onednn_fusion(was_on)


def fused_groups(module, dim: int, rows: int) -> int:
    """Fusion groups in the plan `module` runs for `rows` rows (after its profiling call)."""
    t, x = torch.rand(rows, 1), torch.randn(rows, dim)
    with torch.no_grad():
        for _ in range(3):
            module(t, x)
    return str(torch.jit.last_executed_optimized_graph()).count(f"{fastpath.FUSION_GROUP}_")


def outputs(module, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    t = torch.rand(300, 1, generator=generator)
    x = 4 * torch.randn(300, dim, generator=generator)
    with torch.no_grad():
        return module(t, x), x


@pytest.mark.parametrize(
    ("module", "dim"), [(PostFlow(2), 2), (PostFlow(5, hidden=16, layers=2), 5), (TimeFirst(), 3)]
)
@pytest.mark.parametrize(
    "rewrites",
    [
        ("freeze",),
        ("freeze", "elu"),
        ("freeze", "time_fold"),
        ("freeze", "onednn"),
        fastpath.REWRITES,
    ],
)
def test_each_rewrite_applies_and_keeps_the_numbers(module, dim, rewrites) -> None:
    torch.manual_seed(0)
    loaded = torch.jit.script(module.eval())
    fast, applied, _ = optimize(loaded, dim, rewrites)
    assert applied == list(rewrites)
    graph = str(fast.graph)
    assert ("aten::elu" in graph) == ("elu" not in rewrites)
    concatenates = "aten::cat" in graph or "aten::hstack" in graph  # hstack: see below
    assert concatenates == ("time_fold" not in rewrites)
    expected, _ = outputs(loaded, dim)
    got, _ = outputs(fast, dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rewrites_that_find_nothing_to_do_are_not_reported() -> None:
    _, applied, _ = optimize(torch.jit.script(NoConcat()), 2, fastpath.REWRITES)
    assert applied == ["freeze"]


def test_a_rewrite_that_changes_the_numbers_is_dropped(monkeypatch, caplog) -> None:
    def wrong(graph: torch._C.Graph, signature: Signature) -> bool:
        for node in graph.findAllNodes("aten::elu"):
            node.output().replaceAllUsesWith(node.inputsAt(0))  # elu -> identity
            node.destroy()
        return True

    monkeypatch.setitem(fastpath._GRAPH_REWRITES, "elu", wrong)
    loaded = torch.jit.script(PostFlow(2).eval())
    with caplog.at_level(logging.WARNING, logger="flowserve.fastpath"):
        fast, applied, _ = optimize(loaded, 2, fastpath.REWRITES)
    assert applied == ["freeze", "time_fold", "onednn"]
    assert "graph rewrite elu skipped: output differs from the loaded graph" in caplog.text
    assert "aten::elu" in str(fast.graph)


def test_onednn_fuses_the_graph_and_keeps_an_unfused_copy_for_small_passes() -> None:
    torch.manual_seed(0)
    loaded = torch.jit.script(PostFlow(2).eval())
    fast, applied, unfused = optimize(loaded, 2, ("freeze", "onednn"))
    assert applied == ["freeze", "onednn"]
    assert torch._C._jit_llga_enabled()
    # linear+elu three times, and the last linear; the concatenation may form one more group
    assert fused_groups(fast, 2, 300) >= 4
    assert fused_groups(unfused, 2, 300) == 0
    expected, _ = outputs(loaded, 2)
    torch.testing.assert_close(outputs(unfused, 2)[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(outputs(fast, 2)[0], expected, rtol=1e-5, atol=1e-5)


def test_each_row_count_asked_for_gets_its_own_fused_copy_planned_for_it() -> None:
    torch.manual_seed(0)
    loaded = torch.jit.script(PostFlow(2).eval())
    field = VelocityField(Signature(2, (2,)), loaded)
    fast = optimize_field(field, ("freeze", "onednn"), buckets=(64, 512))
    assert fast.applied == ["freeze", "onednn"]
    assert sorted(fast.planned) == [64, 512]
    copies = {id(fast.module), id(fast.unfused), *(id(copy) for copy in fast.planned.values())}
    assert len(copies) == 4  # each its own graph executor, so its own plans
    for rows, copy in fast.planned.items():
        t, x = torch.rand(rows, 1), 4 * torch.randn(rows, 2)
        with torch.no_grad():
            got = copy(t, x)  # one call: a copy planned for other rows would not run fused yet
        plan = str(torch.jit.last_executed_optimized_graph())
        assert plan.count(f"{fastpath.FUSION_GROUP}_") >= 4
        assert f"Float({rows}, " in plan
        with torch.no_grad():
            torch.testing.assert_close(got, loaded(t, x), rtol=1e-5, atol=1e-5)


def test_a_planned_copy_that_changes_the_numbers_drops_the_fused_graph(monkeypatch, caplog) -> None:
    close = fastpath._close
    # The probes agree; the copy planned for 512 rows does not.
    monkeypatch.setattr(fastpath, "_close", lambda got, want: close(got, want) and len(got) != 512)
    loaded = torch.jit.script(PostFlow(2).eval())
    field = VelocityField(Signature(2, (2,)), loaded)
    with caplog.at_level(logging.WARNING, logger="flowserve.fastpath"):
        fast = optimize_field(field, ("freeze", "onednn"), buckets=(64, 512))
    assert (fast.applied, fast.unfused, fast.planned) == (["freeze"], None, None)
    assert "output differs from the unfused graph at 512 rows" in caplog.text
    assert not torch._C._jit_llga_enabled()
    assert fused_groups(fast.module, 2, 300) == 0


def test_onednn_is_not_reported_when_the_fuser_finds_nothing() -> None:
    torch.jit.enable_onednn_fusion(False)
    fast, applied, unfused = optimize(torch.jit.script(NoConcat()), 2, ("freeze", "onednn"))
    assert applied == ["freeze"]
    assert unfused is None
    assert not torch._C._jit_llga_enabled()
    assert fused_groups(fast, 2, 300) == 0


def test_a_fused_graph_that_changes_the_numbers_is_dropped(monkeypatch, caplog) -> None:
    # oneDNN's kernels round differently from ATen's in the last bits: with no tolerance at
    # all, the fused graph no longer counts as equal and must be refused.
    monkeypatch.setattr(fastpath, "RTOL", 0.0)
    monkeypatch.setattr(fastpath, "ATOL", 0.0)
    loaded = torch.jit.script(PostFlow(2).eval())
    with caplog.at_level(logging.WARNING, logger="flowserve.fastpath"):
        fast, applied, unfused = optimize(loaded, 2, ("freeze", "onednn"))
    assert applied == ["freeze"]
    assert unfused is None
    assert "graph rewrite onednn skipped: output differs from the unfused graph" in caplog.text
    assert not torch._C._jit_llga_enabled()
    assert fused_groups(fast, 2, 300) == 0


def test_onednn_is_left_alone_without_mkldnn(monkeypatch) -> None:
    torch.jit.enable_onednn_fusion(False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    _, applied, unfused = optimize(torch.jit.script(PostFlow(2).eval()), 2)
    assert applied == ["freeze"]
    assert unfused is None
    assert not torch._C._jit_llga_enabled()


@pytest.mark.parametrize("was_on", [False, True])
def test_a_fused_graph_that_is_not_faster_is_not_used(monkeypatch, caplog, was_on) -> None:
    monkeypatch.setattr(fastpath, "_speedup", lambda *_: 0.84)
    torch.jit.enable_onednn_fusion(was_on)
    loaded = torch.jit.script(PostFlow(2).eval())
    with caplog.at_level(logging.INFO, logger="flowserve.fastpath"):
        fast, applied, unfused = optimize(loaded, 2, ("freeze", "onednn"))
    assert applied == ["freeze"]
    assert unfused is None
    assert "onednn skipped: the fused graph is not faster (0.84x at 4099 rows)" in caplog.text
    assert torch._C._jit_llga_enabled() == was_on  # models loaded before keep their fusion
    assert fused_groups(fast, 2, 300) == 0


def test_the_timer_alternates_the_two_graphs() -> None:
    calls: list[str] = []

    def module(name: str):
        def run(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            calls.append(name)
            return x

        return run

    probe = (torch.rand(4, 1), torch.randn(4, 2), None)
    signature = Signature(2, (2,))
    fields = [VelocityField(signature, module(name)) for name in ("fused", "unfused")]
    ratio = TIMER(*fields, probe)
    assert calls == ["fused", "unfused"] * fastpath.TIMING_REPS
    assert ratio > 0


def test_the_fused_graph_leaves_concatenations_along_dim_1_to_aten() -> None:
    torch.manual_seed(0)
    for module, dim, cats_left in [(PostFlow(2), 2, 0), (InnerConcat(), 2, 1)]:
        loaded = torch.jit.script(module.eval())
        fast, applied, unfused = optimize(loaded, dim, ("freeze", "onednn"))
        assert applied == ["freeze", "onednn"]
        # the inputs' concatenation becomes hstack; one of inner values along -1 stays a cat,
        # as its rank is not known from the graph
        assert str(fast.graph).count("aten::hstack") == 1
        assert str(fast.graph).count("aten::cat") == cats_left
        assert "aten::hstack" not in str(unfused.graph)
        expected, _ = outputs(loaded, dim)
        torch.testing.assert_close(outputs(fast, dim)[0], expected, rtol=1e-5, atol=1e-5)
