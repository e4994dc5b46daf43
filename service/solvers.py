"""Explicit Runge-Kutta solvers for dx/dt = v(t, x), one stage at a time.

The maths knows nothing of the web or of batching: `Stepper` advances one block of rows by one
stage per call of `advance`, so a scheduler can interleave stages of many blocks (rows of several
requests, solvers and step counts) in one network evaluation; `integrate` is the plain loop over a
whole batch that uses the very same stepper.

With K steps on [t0, t1] and h = (t1 - t0) / K, Euler is x[k+1] = x[k] + h * v(t0 + k h, x[k]):
for t0 = 0, t1 = 1 that is the contract's sampler, and for t0 = 1, t1 = 0 it is the inverse map
x <- x - (1/K) v(k/K, x) for k = K .. 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""v(t, x): t (n, 1), x (n, m) -> (n, m)."""


@dataclass(frozen=True)
class Tableau:
    """Butcher tableau of an explicit method whose stage i reads only the previous stage's slope.

    c[i]: time offset of stage i (in steps); a[i]: weight of slope i-1 in stage i's input (a[0]
    unused); b[i]: weight of slope i in the step.
    """

    name: str
    c: tuple[float, ...]
    a: tuple[float, ...]
    b: tuple[float, ...]
    order: int

    @property
    def stages(self) -> int:
        return len(self.c)


SOLVERS: dict[str, Tableau] = {
    "euler": Tableau("euler", c=(0.0,), a=(0.0,), b=(1.0,), order=1),
    "midpoint": Tableau("midpoint", c=(0.0, 0.5), a=(0.0, 0.5), b=(0.0, 1.0), order=2),
    "heun": Tableau("heun", c=(0.0, 1.0), a=(0.0, 1.0), b=(0.5, 0.5), order=2),
    "rk4": Tableau(
        "rk4",
        c=(0.0, 0.5, 0.5, 1.0),
        a=(0.0, 0.5, 0.5, 1.0),
        b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
        order=4,
    ),
}


def get_solver(name: str) -> Tableau:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"solver: unknown {name!r}; choose one of {', '.join(SOLVERS)}") from None


def kept_steps(num_steps: int, stride: int) -> list[int]:
    """Step indices a trajectory keeps: 0, stride, 2 stride, ... and always num_steps."""
    kept = list(range(0, num_steps + 1, stride))
    if kept[-1] != num_steps:
        kept.append(num_steps)
    return kept


class Stepper:
    """Integrates one block of rows in place, one stage per `advance` call.

    z: (n, m) state, updated in place (it may be a view into a larger tensor). `t` and `inputs`
    say where the field must be evaluated next; `advance(slope)` consumes v(t, inputs) and returns
    True when it completed a whole step (then `step` has grown by one and `z` holds the new state).
    """

    __slots__ = ("_acc", "_base", "_y", "num_steps", "stage", "step", "t0", "t1", "tableau", "z")

    def __init__(self, z: torch.Tensor, tableau: Tableau, num_steps: int, t0: float, t1: float):
        if num_steps < 1:
            raise ValueError(f"num_steps: must be at least 1, got {num_steps}")
        self.z = z
        self.tableau = tableau
        self.num_steps = num_steps
        self.t0 = t0
        self.t1 = t1
        self.step = 0
        self.stage = 0
        if tableau.stages > 1:
            self._base = z.clone()
            self._acc = torch.zeros_like(z)
            self._y = z.clone()
        else:
            self._base = self._acc = None
            self._y = z

    @property
    def h(self) -> float:
        return (self.t1 - self.t0) / self.num_steps

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps

    @property
    def t(self) -> float:
        """Time of the next evaluation."""
        return (
            self.t0
            + (self.t1 - self.t0) * (self.step + self.tableau.c[self.stage]) / self.num_steps
        )

    @property
    def inputs(self) -> torch.Tensor:
        """(n, m) state at which the next slope is taken."""
        return self._y

    def advance(self, slope: torch.Tensor) -> bool:
        tab, h, i = self.tableau, self.h, self.stage
        if tab.stages == 1:
            self.z.add_(slope, alpha=h)
            self.step += 1
            return True
        self._acc.add_(slope, alpha=tab.b[i])
        if i + 1 < tab.stages:
            torch.add(self._base, slope, alpha=h * tab.a[i + 1], out=self._y)
            self.stage = i + 1
            return False
        self.z.copy_(self._base).add_(self._acc, alpha=h)
        self.step += 1
        self.stage = 0
        if not self.done:
            self._base.copy_(self.z)
            self._acc.zero_()
            self._y.copy_(self.z)
        return True


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
    z = x0.clone()
    stepper = Stepper(z, get_solver(solver), num_steps, t0, t1)
    keep = set(kept_steps(num_steps, stride)) if stride else set()
    path = [z.clone()] if stride else []
    t = torch.empty(z.shape[0], 1, dtype=z.dtype, device=z.device)
    while not stepper.done:
        slope = field(t.fill_(stepper.t), stepper.inputs)
        if stepper.advance(slope) and stepper.step in keep:
            path.append(z.clone())
    return torch.stack(path) if stride else z
