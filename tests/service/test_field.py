"""service.field: the manifest's serving fields, and the one object that calls the network."""

from __future__ import annotations

import pytest
import torch

from service.errors import ModelFailed
from service.field import Condition, Signature, VelocityField

BASE = {"dim": 2}


@pytest.mark.parametrize(
    ("fields", "signature"),
    [
        ({}, Signature(2, (2,))),
        ({"shape": [2]}, Signature(2, (2,))),
        ({"inputs": ["x", "t"], "time_shape": [-1]}, Signature(2, (2,), ("x", "t"), (-1,))),
        (
            {"inputs": ["t", "x", "c"], "condition": {"kind": "class", "classes": ["a", "b"]}},
            Signature(2, (2,), ("t", "x", "c"), (-1, 1), Condition("class", 1, ("a", "b"))),
        ),
        (
            {
                "inputs": ["x", "t", "c"],
                "condition": {"kind": "vector", "dim": 3, "null": [0, 0, 1]},
            },
            Signature(
                2, (2,), ("x", "t", "c"), (-1, 1), Condition("vector", 3, (), (0.0, 0.0, 1.0))
            ),
        ),
    ],
)
def test_a_manifest_reads_as_its_signature(fields: dict, signature: Signature) -> None:
    read = Signature.from_manifest({**BASE, **fields})
    assert read == signature
    again = Signature.from_manifest({**BASE, **read.manifest_fields()})
    assert again == read


def test_shape_of_an_image_model() -> None:
    signature = Signature.from_manifest({"dim": 64, "shape": [1, 8, 8]})
    assert signature.shape == (1, 8, 8)
    assert signature.manifest_fields() == {"shape": [1, 8, 8]}


C = {"inputs": ["t", "x", "c"]}
BAD = [
    ({"shape": [3]}, "shape: [3] holds 3 values, dim is 2"),
    ({"shape": [2, 0]}, "shape: sizes must be positive, got [2, 0]"),
    ({"shape": "2"}, "shape: expected a non-empty list of integers, got '2'"),
    ({"inputs": ["x", "t", "y"]}, 'inputs: expected ["t", "x"] or ["x", "t"] or'),
    (C, 'inputs: lists "c" but the manifest has no condition'),
    (
        {"condition": {"kind": "class", "classes": ["a"]}},
        'inputs: a model with a condition must list "c"',
    ),
    ({"time_shape": [-1, 2]}, "time_shape: expected [-1, 1] or [-1], got [-1, 2]"),
    ({**C, "condition": {"kind": "label"}}, "condition.kind: expected one of class, vector"),
    ({**C, "condition": {"kind": "class", "classes": []}}, "condition.classes: expected a"),
    ({**C, "condition": {"kind": "class", "classes": ["a", "a"]}}, "condition.classes: names"),
    ({**C, "condition": {"kind": "class", "classes": ["a"], "null": -1}}, "condition.null:"),
    ({**C, "condition": {"kind": "vector", "dim": 0}}, "condition.dim: expected a positive"),
    (
        {**C, "condition": {"kind": "vector", "dim": 2, "null": [0.0]}},
        "condition.null: expected 2 finite numbers",
    ),
    ({**C, "condition": {"kind": "vector", "dim": 2, "colour": 1}}, "condition: unknown field"),
]


@pytest.mark.parametrize(("fields", "message"), BAD)
def test_each_bad_field_is_named(fields: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Signature.from_manifest({**BASE, **fields})
    assert str(info.value).startswith(message)


class Recorder(torch.nn.Module):
    """(x, t, c) with t of shape (B,) and x (B, 2, 3): v = x * c + t, c (B,) int64."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x * c.view(-1, 1, 1).to(x.dtype) + t.view(-1, 1, 1)


def test_flat_rows_become_the_models_own_arguments() -> None:
    condition = Condition("class", 1, ("a", "b", "c"), (0.0,))
    signature = Signature(6, (2, 3), ("x", "t", "c"), (-1,), condition)
    field = VelocityField(signature, torch.jit.script(Recorder()))
    t, x = torch.rand(4, 1), torch.randn(4, 6)
    labels = torch.tensor([[1.0], [2.0], [0.0], [1.0]])
    out = field(t, x, labels)
    assert out.shape == (4, 6)
    torch.testing.assert_close(out, x * labels + t)
    # Guided: null (class 0) gives t, the label gives l x + t: w = 3 gives 3 l x + t.
    guided = field(t, x, labels, torch.full((4, 1), 3.0))
    torch.testing.assert_close(guided, 3 * x * labels + t)


class Counter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, t: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        return x * c.unsqueeze(1).to(x.dtype)


def test_a_guided_pass_is_one_call_of_twice_the_rows() -> None:
    counter = Counter()
    condition = Condition("class", 1, ("a", "b"), (0.0,))
    field = VelocityField(Signature(2, (2,), ("t", "x", "c"), (-1, 1), condition), counter)
    field(torch.rand(5, 1), torch.randn(5, 2), torch.ones(5, 1), torch.full((5, 1), 2.0))
    field(torch.rand(5, 1), torch.randn(5, 2), torch.ones(5, 1))
    assert counter.calls == [10, 5]


def test_small_passes_take_the_small_graph() -> None:
    large, small = Counter(), Counter()
    condition = Condition("class", 1, ("a", "b"), (0.0,))
    signature = Signature(2, (2,), ("t", "x", "c"), (-1, 1), condition)
    field = VelocityField(signature, large, small=small, small_rows=8)
    for rows in (3, 4, 8):
        field(torch.rand(rows, 1), torch.randn(rows, 2), torch.ones(rows, 1))
    # guided: 2 x 4 = 8 network rows, the large graph
    field(torch.rand(4, 1), torch.randn(4, 2), torch.ones(4, 1), torch.full((4, 1), 2.0))
    assert (small.calls, large.calls) == ([3, 4], [8, 8])


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda t, x: x[:, :1], "forward(t, x) returned (3, 1) for x of shape (3, 2)"),
        (lambda t, x: x.double(), "forward(t, x) returned torch.float64, expected torch.float32"),
        (lambda t, x: (x, x), "forward(t, x) returned tuple, expected a tensor"),
        (lambda t, x: x.long(), "forward(t, x) returned torch.int64, expected torch.float32"),
    ],
)
def test_what_the_model_returns_is_checked_on_every_call(returned, message: str) -> None:
    field = VelocityField(Signature(2, (2,)), returned)
    with pytest.raises(ModelFailed) as info:
        field(torch.rand(3, 1), torch.randn(3, 2))
    assert str(info.value) == message


def test_guidance_without_a_null_is_refused() -> None:
    condition = Condition("class", 1, ("a", "b"))
    field = VelocityField(Signature(2, (2,), ("t", "x", "c"), (-1, 1), condition), Counter())
    with pytest.raises(ValueError, match="no null condition"):
        field(torch.rand(2, 1), torch.randn(2, 2), torch.ones(2, 1), torch.full((2, 1), 2.0))
