"""Graph rewrites: each one applies to graphs of the right shape, keeps the numbers, and is
dropped (with a log line) when it would change them."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import PostFlow

from service import fastpath
from service.fastpath import optimize

CPU = torch.device("cpu")


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
    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * t


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
    "rewrites", [("freeze",), ("freeze", "elu"), ("freeze", "time_fold"), fastpath.REWRITES]
)
def test_each_rewrite_applies_and_keeps_the_numbers(module, dim, rewrites) -> None:
    torch.manual_seed(0)
    loaded = torch.jit.script(module.eval())
    fast, applied = optimize(loaded, dim, CPU, rewrites)
    assert applied == list(rewrites)
    graph = str(fast.graph)
    assert ("aten::elu" in graph) == ("elu" not in rewrites)
    assert ("aten::cat" in graph) == ("time_fold" not in rewrites)
    expected, _ = outputs(loaded, dim)
    got, _ = outputs(fast, dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rewrites_that_find_nothing_to_do_are_not_reported() -> None:
    _, applied = optimize(torch.jit.script(NoConcat()), 2, CPU, fastpath.REWRITES)
    assert applied == ["freeze"]


def test_a_rewrite_that_changes_the_numbers_is_dropped(monkeypatch, caplog) -> None:
    def wrong(graph: torch._C.Graph, dim: int) -> bool:
        for node in graph.findAllNodes("aten::elu"):
            node.output().replaceAllUsesWith(node.inputsAt(0))  # elu -> identity
            node.destroy()
        return True

    monkeypatch.setitem(fastpath._GRAPH_REWRITES, "elu", wrong)
    loaded = torch.jit.script(PostFlow(2).eval())
    with caplog.at_level(logging.WARNING, logger="flowserve.fastpath"):
        fast, applied = optimize(loaded, 2, CPU, fastpath.REWRITES)
    assert applied == ["freeze", "time_fold"]
    assert "graph rewrite elu skipped: output differs from the loaded graph" in caplog.text
    assert "aten::elu" in str(fast.graph)
