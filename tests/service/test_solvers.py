"""service.solvers against closed forms: constant and polynomial fields, v = -x, backward runs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from service.solvers import SOLVERS, StageRule, get_solver, integrate, kept_steps

ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def start_points() -> torch.Tensor:
    return torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.5, 0.25]], dtype=torch.float64)


def decay(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return -x


def test_every_solver_is_listed_with_its_order() -> None:
    assert {name: tab.order for name, tab in SOLVERS.items()} == ORDERS
    assert [SOLVERS[name].stages for name in ORDERS] == [1, 2, 2, 4]
    for tab in SOLVERS.values():
        assert sum(tab.b) == pytest.approx(1.0)


@pytest.mark.parametrize("solver", ORDERS)
@pytest.mark.parametrize("num_steps", [1, 7])
def test_a_constant_field_is_exact(solver: str, num_steps: int) -> None:
    velocity = torch.tensor([0.75, -2.0], dtype=torch.float64)
    x0 = start_points()
    out = integrate(lambda t, x: velocity.expand_as(x), x0, num_steps, solver)
    torch.testing.assert_close(out, x0 + velocity, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("solver", "degree"), [("midpoint", 1), ("heun", 1), ("rk4", 2), ("rk4", 3)]
)
def test_time_polynomials_up_to_the_order_are_exact(solver: str, degree: int) -> None:
    # dx/dt = (degree + 1) t^degree lands exactly 1 further: the quadrature rule behind each
    # solver integrates polynomials of degree < order without error.
    x0 = start_points()
    out = integrate(lambda t, x: ((degree + 1) * t**degree).expand_as(x), x0, 3, solver)
    torch.testing.assert_close(out, x0 + 1.0, rtol=0, atol=1e-12)


def test_euler_is_the_contract_loop_for_a_time_dependent_field() -> None:
    def field(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(3 * t) * x + t

    x0 = start_points()
    expected = x0.clone()
    num_steps = 7
    for k in range(num_steps):
        t = torch.full((3, 1), k / num_steps, dtype=torch.float64)
        expected = expected + (1 / num_steps) * field(t, expected)
    torch.testing.assert_close(integrate(field, x0, num_steps), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("solver", ORDERS)
def test_decay_converges_to_x0_over_e_at_the_solver_order(solver: str) -> None:
    x0 = start_points()
    exact = x0 * math.exp(-1)
    steps = [8, 16, 32, 64]
    errors = [(integrate(decay, x0, k, solver) - exact).abs().max().item() for k in steps]
    observed = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
    assert errors[-1] < 0.02
    for order in observed:
        assert order == pytest.approx(ORDERS[solver], abs=0.15)


@pytest.mark.parametrize("solver", ORDERS)
def test_a_step_on_decay_multiplies_by_the_taylor_polynomial(solver: str) -> None:
    # One step of any of these tableaus on v = -x multiplies by the Taylor polynomial of e^-h of
    # degree `order` (all four are exact on linear fields up to that degree).
    num_steps, h = 5, 0.2
    factor = sum((-h) ** j / math.factorial(j) for j in range(ORDERS[solver] + 1))
    x0 = start_points()
    out = integrate(decay, x0, num_steps, solver)
    torch.testing.assert_close(out, x0 * factor**num_steps, rtol=1e-12, atol=0)


@pytest.mark.parametrize("solver", ORDERS)
def test_backward_integration_inverts_forward(solver: str) -> None:
    x0 = start_points()
    # From t = 1 to t = 0 the decay field grows the state by e.
    back = integrate(decay, x0, 64, solver, t0=1.0, t1=0.0)
    tolerance = {1: 3e-2, 2: 1e-3, 4: 1e-7}[ORDERS[solver]]
    torch.testing.assert_close(back, x0 * math.e, rtol=tolerance, atol=0)
    roundtrip = integrate(decay, integrate(decay, x0, 64, solver), 64, solver, t0=1.0, t1=0.0)
    torch.testing.assert_close(roundtrip, x0, rtol=tolerance, atol=0)


def test_backward_euler_steps_are_the_inverse_map_of_the_docstring() -> None:
    def field(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t * x + 1

    x1 = start_points()
    num_steps = 4
    expected = x1.clone()
    for k in range(num_steps, 0, -1):
        t = torch.full((3, 1), k / num_steps, dtype=torch.float64)
        expected = expected - (1 / num_steps) * field(t, expected)
    back = integrate(field, x1, num_steps, t0=1.0, t1=0.0)
    torch.testing.assert_close(back, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    ("num_steps", "stride", "kept"),
    [
        (1, 1, [0, 1]),
        (4, 1, [0, 1, 2, 3, 4]),
        (4, 2, [0, 2, 4]),
        (5, 2, [0, 2, 4, 5]),
        (10, 3, [0, 3, 6, 9, 10]),
        (7, 7, [0, 7]),
    ],
)
def test_kept_steps(num_steps: int, stride: int, kept: list[int]) -> None:
    assert kept_steps(num_steps, stride) == kept


@pytest.mark.parametrize("solver", ORDERS)
def test_strided_integration_keeps_the_states_of_the_kept_steps(solver: str) -> None:
    x0 = start_points()
    num_steps, stride = 5, 2
    path = integrate(decay, x0, num_steps, solver, stride=stride)
    kept = kept_steps(num_steps, stride)
    assert path.shape == (len(kept), 3, 2)
    h = 1 / num_steps
    factor = sum((-h) ** j / math.factorial(j) for j in range(ORDERS[solver] + 1))
    for state, step in zip(path, kept, strict=True):
        torch.testing.assert_close(state, x0 * factor**step, rtol=1e-12, atol=0)
    torch.testing.assert_close(path[-1], integrate(decay, x0, num_steps, solver))


def test_integrate_leaves_its_input_alone() -> None:
    x0 = start_points()
    before = x0.clone()
    integrate(decay, x0, 3, "rk4")
    assert torch.equal(x0, before)


def test_unknown_solver_names_the_choices() -> None:
    with pytest.raises(
        ValueError,
        match=r"^solver: unknown 'rk5'; choose one of "
        r"euler, midpoint, heun, rk4$",
    ):
        get_solver("rk5")


def test_integrate_needs_a_step() -> None:
    with pytest.raises(ValueError, match=r"^num_steps: must be at least 1, got 0$"):
        integrate(decay, start_points(), 0)


def test_the_stage_rule_reports_stage_times_and_whole_steps() -> None:
    # Two rk4 steps on v = 1, one row: the stage times are those of the tableau, a step completes
    # on the fourth stage only, and the state lands exactly 1 further.
    rule = StageRule(SOLVERS["rk4"], "cpu", torch.float64)
    base, y, acc = (torch.zeros(1, 1, dtype=torch.float64) for _ in range(3))
    h = torch.full((1, 1), 0.5, dtype=torch.float64)
    start = torch.zeros(1, 1, dtype=torch.float64)
    steps = torch.zeros(1, 1, dtype=torch.float64)
    times, completed = [], []
    for _ in range(2):
        for i in range(4):
            stage = torch.tensor([i])
            times.append(rule.times(start, steps, stage, h).item())
            last = rule.update(base, y, acc, torch.ones(1, 1, dtype=torch.float64), h, stage)
            completed.append(bool(last.item()))
        steps += 1
    assert times == [0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0]
    assert completed == [False, False, False, True] * 2
    assert base.item() == pytest.approx(1.0)
    assert torch.equal(y, base)
    assert acc.item() == 0.0


def test_rows_at_different_stages_advance_as_they_would_alone() -> None:
    # One update over rows at stages 0 and 1 of heun equals each row updated on its own.
    rule = StageRule(SOLVERS["heun"], "cpu", torch.float64)
    base = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [2.5]], dtype=torch.float64)
    acc = torch.tensor([[0.0], [0.25]], dtype=torch.float64)
    slope = torch.tensor([[0.5], [-1.0]], dtype=torch.float64)
    h = torch.full((2, 1), 0.1, dtype=torch.float64)
    stage = torch.tensor([0, 1])
    alone = []
    for row in range(2):
        parts = [t[row : row + 1].clone() for t in (base, y, acc)]
        rule.update(*parts, slope[row : row + 1], h[row : row + 1], stage[row : row + 1])
        alone.append(parts)
    last = rule.update(base, y, acc, slope, h, stage)
    assert last.squeeze(1).tolist() == [False, True]
    for row in range(2):
        for together, own in zip((base, y, acc), alone[row], strict=True):
            assert torch.equal(together[row : row + 1], own)
    # Row 0 is now at heun's second stage: y = base + h * slope; row 1 finished its step.
    assert y[0].item() == pytest.approx(1.0 + 0.1 * 0.5)
    assert base[1].item() == pytest.approx(2.0 + 0.1 * (0.25 + 0.5 * -1.0))
