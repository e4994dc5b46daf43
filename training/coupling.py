"""How a minibatch pairs source points x0 with target points x1.

"independent" keeps the random pairing of two independent draws (the reference algorithm).
"ot" re-pairs them by the exact optimal assignment under squared Euclidean cost: with uniform
weights on both sides the optimal transport plan between two equal-size clouds is a permutation
(Birkhoff), so `scipy.optimize.linear_sum_assignment` finds it exactly. Paths of OT pairs do
not cross, so the learned field is straighter and few-step sampling gets better.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment


def ot_permutation(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The permutation `perm` minimising sum_i ||x0[i] - x1[perm[i]]||^2.

    x0, x1: (n, d) on any device. Returns (n,) int64 on x1's device.
    """
    a, b = x0.detach().double().cpu(), x1.detach().double().cpu()
    # ||a_i - b_j||^2 = ||a_i||^2 + ||b_j||^2 - 2 a_i.b_j, and every assignment pays each
    # ||a_i||^2 and ||b_j||^2 exactly once: minimising -a_i.b_j gives the same permutation,
    # and the solver finishes that matrix about twice as fast on clustered targets.
    rows, cols = linear_sum_assignment(-(a @ b.T).numpy())
    perm = torch.empty(len(rows), dtype=torch.int64)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm.to(x1.device)


def pair(x0: torch.Tensor, x1: torch.Tensor, coupling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x0, x1') where x1' is x1 re-ordered by the coupling. x0, x1: (n, d)."""
    if coupling in ("independent", "reflow"):  # reflow pairs are fixed before training
        return x0, x1
    if coupling == "ot":
        return x0, x1[ot_permutation(x0, x1)]
    raise ValueError(f"train.coupling: unknown {coupling!r}; choose independent or ot")
