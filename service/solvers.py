"""Explicit Runge-Kutta solvers for dx/dt = v(t, x), one stage at a time, for many rows at once.

The maths knows nothing of the web or of batching. `StageRule` applies one stage of a tableau to a
block of rows in place, where every row may be at its own stage, time and step size: the engine
uses it to advance rows of many requests (different solvers' lanes, step counts and directions)
in shared network evaluations, and `integrate`, the plain loop over a whole batch, uses the very
same update.

With K steps on [t0, t1] and h = (t1 - t0) / K, Euler is x[k+1] = x[k] + h * v(t0 + k h, x[k]):
for t0 = 0, t1 = 1 that is the contract's sampler, and for t0 = 1, t1 = 0 it is the inverse map
x <- x - (1/K) v(k/K, x) for k = K .. 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from service.tableau import SOLVER_NAMES, SOLVERS, Tableau, get_solver, kept_steps

__all__ = [
    "SOLVERS",
    "SOLVER_NAMES",
    "Field",
    "StageRule",
    "Tableau",
    "get_solver",
    "integrate",
    "kept_steps",
]

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""v(t, x): t (n, 1), x (n, m) -> (n, m)."""


class StageRule:
    """One tableau's coefficients as per-stage tensors, so that one call updates many rows, each
    at its own stage.

    A row's state for a multi-stage method is: `base` (n, m), the state at the start of the step;
    `y` (n, m), where the next slope is taken; `acc` (n, m), the weighted sum of the step's slopes
    so far; `stage` (n,) or (n, 1), its stage index (a float or integer tensor); `steps` (n, 1),
    whole steps done. Euler needs none but x (its `y` is x itself).
    """

    def __init__(
        self, tableau: Tableau, device: torch.device | str, dtype: torch.dtype = torch.float32
    ):
        stages = tableau.stages
        self.tableau = tableau
        self.stages = stages
        self.c = torch.tensor(tableau.c, device=device, dtype=dtype)
        self.b = torch.tensor(tableau.b, device=device, dtype=dtype)
        self.a_next = torch.tensor([*tableau.a[1:], 0.0], device=device, dtype=dtype)
        self.last = torch.tensor([i == stages - 1 for i in range(stages)], device=device)

    def times(
        self, t0: torch.Tensor, steps: torch.Tensor, stage: torch.Tensor, h: torch.Tensor
    ) -> torch.Tensor:
        """(n, 1) time of each row's next evaluation: t0 + (steps + c[stage]) h."""
        return torch.addcmul(t0, steps + self.c[stage].unsqueeze(1), h)

    def update(
        self,
        base: torch.Tensor,
        y: torch.Tensor,
        acc: torch.Tensor,
        slope: torch.Tensor,
        h: torch.Tensor,
        stage: torch.Tensor,
    ) -> torch.Tensor:
        """Consume `slope` = v(t, y) for every row, in place; returns (n, 1) bool: True for rows
        that completed a step (their `base` and `y` now hold the new state, `acc` is zero)."""
        acc.addcmul_(self.b[stage].unsqueeze(1), slope)
        last = self.last[stage].unsqueeze(1)
        new_base = torch.addcmul(base, h, acc)
        stage_input = torch.addcmul(base, h * self.a_next[stage].unsqueeze(1), slope)
        base.copy_(torch.where(last, new_base, base))
        y.copy_(torch.where(last, new_base, stage_input))
        acc.masked_fill_(last, 0.0)
        return last


def integrate(
    field: Field,
    x0: torch.Tensor,
    num_steps: int,
    solver: str = "euler",
    *,
    t0: float = 0.0,
    t1: float = 1.0,
    stride: int | None = None,
) -> torch.Tensor:
    """Solve from t0 to t1 in `num_steps` steps of `solver`.

    x0: (n, m). Returns the final state (n, m), or with `stride` the kept states
    (len(kept_steps(num_steps, stride)), n, m).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps: must be at least 1, got {num_steps}")
    tableau = get_solver(solver)
    n, dtype, device = x0.shape[0], x0.dtype, x0.device
    keep = set(kept_steps(num_steps, stride)) if stride else set()
    h = torch.full((n, 1), (t1 - t0) / num_steps, dtype=dtype, device=device)
    start = torch.full((n, 1), t0, dtype=dtype, device=device)
    x = x0.clone()
    path = [x.clone()] if stride else []
    rule = StageRule(tableau, device, dtype)
    if tableau.stages > 1:
        y, acc = x.clone(), torch.zeros_like(x)
    for step in range(num_steps):
        steps = torch.full((n, 1), float(step), dtype=dtype, device=device)
        if tableau.stages == 1:
            x.addcmul_(h, field(torch.addcmul(start, steps, h), x))
        else:
            for i in range(tableau.stages):
                stage = torch.full((n,), i, dtype=torch.long, device=device)
                slope = field(rule.times(start, steps, stage, h), y)
                rule.update(x, y, acc, slope, h, stage)
        if step + 1 in keep:
            path.append(x.clone())
    return torch.stack(path) if stride else x
