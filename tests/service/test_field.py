"""service.field: the manifest's serving fields, and the one object that calls the network."""

from __future__ import annotations

import pytest
import torch

from service.errors import ModelFailed
from service.fastpath import row_buckets
from service.field import CALL_ROWS, Condition, Signature, VelocityField, bucket_plan

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


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16, 17, 31, 33, 64, 65, 100, 129, 200, 333])
def test_planned_copies_each_see_only_their_own_row_count(rows: int) -> None:
    buckets = (8, 16, 32, 64)
    planned = {bucket: Counter() for bucket in buckets}
    small = Counter()
    condition = Condition("class", 1, ("a", "b", "c"), (0.0,))
    signature = Signature(2, (2,), ("t", "x", "c"), (-1, 1), condition)
    field = VelocityField(signature, Counter(), small=small, small_rows=4, planned=planned)
    t, x = torch.rand(rows, 1), torch.randn(rows, 2)
    labels = (torch.arange(rows) % 3).to(torch.float32).unsqueeze(1)
    torch.testing.assert_close(field(t, x, labels), x * labels, rtol=0, atol=0)
    # guided, w = 2 and null class 0 (v = 0): 2 l x, in one call of 2 x rows network rows
    guided = field(t, x, labels, torch.full((rows, 1), 2.0))
    torch.testing.assert_close(guided, 2 * x * labels, rtol=0, atol=0)
    for bucket, counter in planned.items():
        assert set(counter.calls) <= {bucket}
    network_rows = (rows, 2 * rows)
    assert small.calls == [n for n in network_rows if n < 4]
    calls = sum(len(bucket_plan(n, buckets)) for n in network_rows if n >= 4)
    assert sum(len(counter.calls) for counter in planned.values()) == calls


def test_an_answer_that_is_the_models_input_survives_the_next_pass() -> None:
    # Padded pieces go through reused buffers: an answer that is its input must not be one.
    calls = []

    def identity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x

    field = VelocityField(Signature(2, (2,)), identity, planned={8: identity, 16: identity})
    first_x, second_x = torch.randn(5, 2), torch.randn(6, 2)
    first = field(torch.rand(5, 1), first_x)
    second = field(torch.rand(6, 1), second_x)
    assert calls == [8, 8]
    torch.testing.assert_close(first, first_x, rtol=0, atol=0)
    torch.testing.assert_close(second, second_x, rtol=0, atol=0)


def least_costs(rows: int, buckets: tuple[int, ...]) -> list[int]:
    """The least cost of covering each row count up to `rows` with calls of bucket sizes (each
    costing its bucket plus CALL_ROWS), by dynamic programming over every way to do it."""
    best = [0] * (rows + 1)
    for n in range(1, rows + 1):
        best[n] = min(b + CALL_ROWS + best[max(0, n - b)] for b in buckets)
    return best


@pytest.mark.parametrize(("min_rows", "smallest"), [(0, 16), (128, 128), (1000, 1024)])
def test_a_pass_is_planned_at_the_least_cost(min_rows: int, smallest: int) -> None:
    buckets = row_buckets(min_rows)
    assert buckets == tuple(2**k for k in range(smallest.bit_length() - 1, 15))
    best = least_costs(20_000, buckets)
    for rows in [*range(1, 2100), 16_383, 16_384, 16_385, 20_000]:
        plan = bucket_plan(rows, buckets)
        assert sum(taken for taken, _ in plan) == rows
        assert all(0 < taken <= bucket and bucket in buckets for taken, bucket in plan)
        assert all(taken == bucket for taken, bucket in plan[:-1])  # only the last is padded
        assert sum(bucket + CALL_ROWS for _, bucket in plan) == best[rows]
    assert bucket_plan(40_000, buckets)[:2] == ((16_384, 16_384),) * 2


def test_a_pass_just_under_a_bucket_is_padded_and_one_just_over_is_split() -> None:
    buckets = row_buckets(128)
    assert buckets == (128, 256, 512, 1024, 2048, 4096, 8192, 16_384)
    assert bucket_plan(1008, buckets) == ((1008, 1024),)
    assert bucket_plan(1040, buckets) == ((1024, 1024), (16, 128))


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
