import itertools

import pytest
import torch

from training.coupling import ot_permutation, pair


def batch_cost(x0, x1, perm):
    return float((x0 - x1[perm]).square().sum())


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ot_permutation_minimises_the_batch_cost(n, seed):
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(n, 2, generator=g), 3 * torch.randn(n, 2, generator=g)
    perm = ot_permutation(x0, x1)
    assert sorted(perm.tolist()) == list(range(n))
    best = min(batch_cost(x0, x1, torch.tensor(p)) for p in itertools.permutations(range(n)))
    assert batch_cost(x0, x1, perm) == pytest.approx(best, rel=1e-6, abs=1e-9)


def test_ot_undoes_a_shuffle_of_a_translate():
    x0 = torch.randn(64, 3)
    shuffle = torch.randperm(64)
    x1 = (x0 + 0.01)[shuffle]
    paired0, paired1 = pair(x0, x1, "ot")
    torch.testing.assert_close(paired1, x0 + 0.01)
    assert paired0 is x0


def test_independent_keeps_the_draws():
    x0, x1 = torch.randn(5, 2), torch.randn(5, 2)
    assert pair(x0, x1, "independent") == (x0, x1)


def test_unknown_coupling():
    with pytest.raises(ValueError, match=r"^train\.coupling: unknown 'sinkhorn'"):
        pair(torch.zeros(2, 2), torch.zeros(2, 2), "sinkhorn")
