"""Which rows go into the next forward pass: pure bookkeeping, no threads and no tensors.

At most `budget` rows of network work go into a pass (a guided row costs two), handed out one
unit per job in turn, so a small request is answered after a few passes however large the
request beside it. Each job's queue of units is rotated past the ones taken, so the units left
out of this pass come first in the next one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping
from typing import Protocol, TypeVar


class Work(Protocol):
    @property
    def cost(self) -> int: ...


W = TypeVar("W", bound=Work)


def fair_share(queues: Mapping[Hashable, deque[W]], order: list[Hashable], budget: int) -> list[W]:
    """Units for one pass: round-robin over `order` (jobs, the first one served first), one unit
    of each job's queue at a time while it fits in `budget`. Every queue is rotated by the number
    of units taken from it."""
    taken: dict[Hashable, int] = dict.fromkeys(order, 0)
    selected: list[W] = []
    progress = True
    while progress:
        progress = False
        for job in order:
            units = queues[job]
            if taken[job] < len(units) and units[taken[job]].cost <= budget:
                unit = units[taken[job]]
                taken[job] += 1
                selected.append(unit)
                budget -= unit.cost
                progress = True
    for job, count in taken.items():
        queues[job].rotate(-count)
    return selected
