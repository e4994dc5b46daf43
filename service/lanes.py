"""Lanes: the per-row state of many requests' rows in one tensor, so one pass over a lane costs a
fixed number of tensor operations however many requests it holds.

A lane holds the rows that share a solver, a state width, a way of taking the divergence, a
condition width and whether they are guided. A request's rows are split into units (blocks of
rows); a unit's rows are contiguous in the lane until it leaves. `Layout` names the columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from service.solvers import StageRule, Tableau

if TYPE_CHECKING:
    from service.engine import Job

MOVES = 4
"""Compaction moves up to this many runs of kept rows one by one (a copy each, of only the rows
after the first hole); more, and it gathers every kept row at once."""

Slope = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""slope(t (n, 1), y (n, m), block (n, width)) -> (n, m): the field at the stage inputs; the
block gives access to the rows' other columns (condition, guidance, probes)."""


@dataclass(frozen=True)
class Layout:
    """Which columns of a lane's float32 state hold what.

    x (m): the state. For multi-stage solvers, y (m): where the next slope is taken, and acc (m):
    the step's weighted slopes so far (for Euler y is x itself). h: the step; t0: the start time;
    steps: whole steps done; stage: the stage index (multi-stage only). c: the condition (a class
    index in one column, or a vector), w: the guidance scale (guided lanes only), probes: the
    Hutchinson probes (P * dim), each absent when unused.
    """

    m: int
    multistage: bool
    x: slice
    y: slice
    acc: slice | None
    h: slice
    t0: slice
    steps: slice
    stage: int | None
    c: slice | None
    w: slice | None
    probes: slice | None
    width: int

    @classmethod
    def build(
        cls, m: int, stages: int, condition_width: int = 0, guided: bool = False, probes: int = 0
    ) -> Layout:
        multistage = stages > 1
        columns: dict[str, slice] = {}
        at = 0

        def take(name: str, count: int) -> None:
            nonlocal at
            columns[name] = slice(at, at + count)
            at += count

        take("x", m)
        if multistage:
            take("y", m)
            take("acc", m)
        for name in ("h", "t0", "steps"):
            take(name, 1)
        stage = None
        if multistage:
            stage = at
            at += 1
        if condition_width:
            take("c", condition_width)
        if guided:
            take("w", 1)
        if probes:
            take("probes", probes)
        return cls(
            m=m,
            multistage=multistage,
            x=columns["x"],
            y=columns.get("y", columns["x"]),
            acc=columns.get("acc"),
            h=columns["h"],
            t0=columns["t0"],
            steps=columns["steps"],
            stage=stage,
            c=columns.get("c"),
            w=columns.get("w"),
            probes=columns.get("probes"),
            width=at,
        )


@dataclass(eq=False)
class Unit:
    """A block of one job's rows in a lane."""

    job: Job
    lane: Lane
    job_start: int  # first row of this unit within its job
    rows: int
    offset: int = 0  # first row within the lane; moves when the lane compacts
    done: int = 0  # stages done: steps x stages + stage
    next_event: int = 0  # `done` at the next kept step or the last one (set by the engine)
    keep_index: dict[int, int] | None = None
    dead: bool = False

    @property
    def cost(self) -> int:
        """Rows this unit puts through the network per pass (two per guided row)."""
        return self.rows * self.lane.evaluations


class Lane:
    """The rows of every unit that shares a layout and a tableau, in one tensor `state`."""

    def __init__(
        self,
        tableau: Tableau,
        layout: Layout,
        device: torch.device,
        slope: Slope,
        evaluations: int = 1,
    ):
        self.stages = tableau.stages
        self.rule = StageRule(tableau, device)
        self.layout = layout
        self.slope = slope
        self.evaluations = evaluations
        self.device = device
        self.state = torch.zeros(0, layout.width, device=device)
        self.rows = 0
        self.units: list[Unit] = []
        """In the order of their rows (`offset`), holes included until `compact`."""
        self._holes = 0
        """Units that left without their rows being taken (`remove`): `compact` drops them."""
        self._full: torch.Tensor | None = None
        self._full_columns: tuple[torch.Tensor, ...] = ()

    def append(
        self,
        unit: Unit,
        z: torch.Tensor,
        t0: float,
        h: float,
        *,
        probes: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        guidance: float | None = None,
    ) -> None:
        """Add `unit`'s rows: start state z (rows, m), the unit's slices of the job's probes
        (rows, P, dim) and condition (rows, width), and the job's guidance scale."""
        self._full = None
        needed = self.rows + unit.rows
        if needed > self.state.shape[0]:
            grown = torch.zeros(
                max(needed, 2 * self.state.shape[0], 64), self.layout.width, device=self.device
            )
            grown[: self.rows] = self.state[: self.rows]
            self.state = grown
        block = self.state[self.rows : needed]
        block.zero_()
        layout = self.layout
        block[:, layout.x] = z
        if layout.multistage:
            block[:, layout.y] = z
        block[:, layout.h] = h
        block[:, layout.t0] = t0
        if layout.c is not None:
            block[:, layout.c] = condition
        if layout.w is not None:
            block[:, layout.w] = guidance
        if layout.probes is not None:
            block[:, layout.probes] = probes.reshape(unit.rows, -1)
        unit.offset = self.rows
        self.rows = needed
        self.units.append(unit)

    def remove(self, unit: Unit) -> None:
        """`unit` leaves the lane (it finished, or its job failed). When the lane's last unit has
        as many rows, those rows move into its place (one copy of a unit's rows: under steady
        load of same-sized requests, the usual case); else its rows stay, a hole, until
        `compact`, which also runs once holes are left."""
        unit.dead = True
        last = self.units[-1]
        if self._holes or (last is not unit and last.rows != unit.rows):
            self._holes += 1
            return
        self._full = None
        if last is not unit:
            end = last.offset + last.rows
            self.state[unit.offset : unit.offset + unit.rows] = self.state[last.offset : end]
            last.offset = unit.offset
            self.units[self.units.index(unit)] = last
        self.units.pop()
        self.rows -= unit.rows
        self._shrink()

    def compact(self) -> None:
        """Drop the rows of the units that left as holes (`remove`), keeping the others in
        order."""
        if not self._holes:
            return
        alive = [u for u in self.units if not u.dead]
        self._full = None
        self._holes = 0
        starts, ends = _runs(alive)
        if len(starts) > MOVES:
            kept = self.state.index_select(0, _index(starts, ends, self.device))
            self.state[: kept.shape[0]] = kept
        else:  # a few runs (a job or two left): each moves down to where the one before ends
            at = 0
            for start, end in zip(starts, ends, strict=True):
                if start != at:
                    run = self.state[start:end]
                    if start - at < end - start:  # it overlaps its new place
                        run = run.clone()
                    self.state[at : at + end - start] = run
                at += end - start
        offset = 0
        for unit in alive:
            unit.offset = offset
            offset += unit.rows
        self.rows = offset
        self.units = alive
        self._shrink()

    def _shrink(self) -> None:
        """Let go of most of a state tensor that is four times larger than the rows it holds."""
        if self.state.shape[0] > 64 and self.rows < self.state.shape[0] // 4:
            self.state = self.state[: max(self.rows * 2, 64)].clone()

    def advance(self, s: torch.Tensor) -> None:
        """One stage for every row of `s` (a block of `state`, updated in place)."""
        layout = self.layout
        if not layout.multistage:
            if s is self._full:  # the common case: reuse the column views of the whole lane
                x, h, t0, steps = self._full_columns
            else:
                x, h, t0, steps = self._euler_columns(s)
            t = torch.addcmul(t0, steps, h)
            x.addcmul_(h, self.slope(t, x, s))
            steps.add_(1.0)
            return
        h, t0, steps = s[:, layout.h], s[:, layout.t0], s[:, layout.steps]
        stage_col = s[:, layout.stage]
        stage = stage_col.long()
        t = self.rule.times(t0, steps, stage, h)
        y = s[:, layout.y]
        slope = self.slope(t, y, s)
        last = self.rule.update(s[:, layout.x], y, s[:, layout.acc], slope, h, stage)
        steps.add_(last.to(steps.dtype))
        stage_col.copy_(torch.where(last.squeeze(1), 0.0, stage_col + 1))

    def progress(self, s: torch.Tensor) -> torch.Tensor:
        """(n,) stages done by each row of `s`: steps x stages + stage. A stage that ran adds 1."""
        steps = s[:, self.layout.steps].squeeze(1) * self.stages
        return steps if self.layout.stage is None else steps + s[:, self.layout.stage]

    def _euler_columns(self, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layout = self.layout
        return s[:, layout.x], s[:, layout.h], s[:, layout.t0], s[:, layout.steps]

    def full(self) -> torch.Tensor:
        """The state of every row of the lane (a view, cached until rows come or go)."""
        if self._full is None:
            self._full = self.state[: self.rows]
            if not self.layout.multistage:
                self._full_columns = self._euler_columns(self._full)
        return self._full


def rows_of(units: list[Unit], device: torch.device) -> torch.Tensor:
    """The lane rows of `units`, in their order: (sum of rows,) int64 on `device`."""
    return _index(*_runs(units), device)


def _runs(units: list[Unit]) -> tuple[list[int], list[int]]:
    """Starts and ends of the runs of lane rows `units` cover, in their order: units that follow
    each other in the lane make one run."""
    starts: list[int] = []
    ends: list[int] = []
    for unit in units:
        if ends and ends[-1] == unit.offset:
            ends[-1] += unit.rows
        else:
            starts.append(unit.offset)
            ends.append(unit.offset + unit.rows)
    return starts, ends


def _index(starts: list[int], ends: list[int], device: torch.device) -> torch.Tensor:
    if len(starts) == 1:
        return torch.arange(starts[0], ends[0], device=device)
    rows = np.concatenate([np.arange(start, end) for start, end in zip(starts, ends, strict=True)])
    return torch.from_numpy(rows).to(device)
