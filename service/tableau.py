"""Butcher tableaus of the explicit Runge-Kutta methods the service offers, and which states a
trajectory keeps. Pure Python: the client and the command line read the solver names from here
without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


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
SOLVER_NAMES: tuple[str, ...] = tuple(SOLVERS)
"""The `solver` values of the API, in the order the docs list them; "euler" is the default."""


def get_solver(name: str) -> Tableau:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"solver: unknown {name!r}; choose one of {', '.join(SOLVERS)}") from None


def kept_steps(num_steps: int, stride: int) -> list[int]:
    """Step indices a trajectory keeps: 0, stride, 2 stride, ... and always num_steps."""
    if num_steps < 1 or stride < 1:
        raise ValueError(f"num_steps and stride must be >= 1, got {num_steps} and {stride}")
    kept = list(range(0, num_steps + 1, stride))
    if kept[-1] != num_steps:
        kept.append(num_steps)
    return kept
