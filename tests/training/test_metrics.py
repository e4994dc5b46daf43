import pytest
import torch

from service.mixture import GaussianMixture
from training.datasets import MixtureTarget
from training.metrics import mean_w2, mode_stats, npe, path_energy, score, w2


def cloud(n=300, d=2, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_w2_of_a_cloud_to_itself_is_zero():
    x = cloud()
    assert w2(x, x) == 0.0
    assert w2(x, x[torch.randperm(len(x))]) == 0.0


@pytest.mark.parametrize("shift", [[3.0, -4.0], [0.5, 0.0], [-1.0, 2.0]])
def test_w2_to_a_translate_is_the_shift_length(shift):
    x = cloud()
    c = torch.tensor(shift)
    assert w2(x, x + c) == pytest.approx(float(torch.linalg.norm(c)), rel=1e-6)


def test_w2_rejects_clouds_of_different_sizes():
    with pytest.raises(ValueError, match="same shape"):
        w2(cloud(10), cloud(11))


def test_mean_w2_averages_chunks():
    x = cloud(400)
    assert mean_w2(x, x + torch.tensor([0.0, 2.0]), chunk=100) == pytest.approx(2.0, rel=1e-6)


def constant_field(t, x):
    return torch.ones_like(x) * torch.tensor([1.5, -2.0])


def test_npe_is_zero_for_a_straight_constant_field():
    x0 = cloud(400)
    assert npe(constant_field, x0, num_steps=10, chunk=200) == pytest.approx(0.0, abs=1e-6)


def test_path_energy_of_a_constant_field():
    x1, energy = path_energy(constant_field, cloud(50), num_steps=4)
    torch.testing.assert_close(x1, cloud(50) + torch.tensor([1.5, -2.0]))
    torch.testing.assert_close(energy, torch.full((50,), 1.5**2 + 2.0**2, dtype=torch.float64))


def test_npe_of_a_detour_is_positive():
    # Every path goes out along +x and back: the end cloud is the start cloud, W2 = 0 but the
    # energy is not; with a tiny overall shift W2 is small and NPE is large.
    def detour(t, x):
        return torch.where(t < 0.5, 1.0, -1.0) * torch.tensor([1.0, 0.0]) + 0.1

    assert npe(detour, cloud(200), num_steps=10, chunk=100) > 10


MIXTURE = GaussianMixture.from_spec(
    {
        "means": [[4.0, 0.0], [-4.0, 0.0]],
        "covs": [[[0.25, 0.0], [0.0, 0.25]]] * 2,
        "weights": [0.75, 0.25],
    }
)


def test_mode_stats_of_exact_samples():
    samples = MIXTURE.sample(20_000, torch.Generator().manual_seed(0))
    stats = mode_stats(samples, MIXTURE)
    assert [s["share"] for s in stats] == pytest.approx([0.75, 0.25], abs=0.01)
    assert all(s["mean_error"] < 0.03 and s["cov_error"] < 0.03 for s in stats)
    assert stats[0]["mean"] == [4.0, 0.0]


def test_mode_stats_of_an_empty_mode():
    stats = mode_stats(torch.tensor([[4.0, 0.0], [4.1, 0.0]]), MIXTURE)
    assert stats[1]["share"] == 0.0 and stats[1]["mean_error"] is None


def test_score_of_the_exact_map_is_near_the_floor():
    # Source = target and v = 0: generated samples are exact target samples at every step count.
    gaussian = GaussianMixture.from_spec(
        {"means": [[1.0, 2.0]], "covs": [[[1.0, 0.3], [0.3, 0.5]]], "weights": [1.0]}
    )
    quality = score(
        lambda t, x: torch.zeros_like(x),
        gaussian,
        MixtureTarget(gaussian),
        torch.Generator().manual_seed(1),
        num_samples=2000,
        chunk=500,
        step_counts=(1, 4),
    )
    assert set(quality["by_steps"]) == {"1", "4"}
    assert quality["w2"] == quality["by_steps"]["4"]["w2"]
    assert 0.8 < quality["w2_ratio"] < 1.25
    assert quality["npe"] == 0.0
    assert quality["modes"][0]["share"] == 1.0


def test_score_of_a_shifted_map_is_far_from_the_floor():
    shift = torch.tensor([2.0, 0.0])
    quality = score(
        lambda t, x: shift.expand_as(x),
        MIXTURE,
        MixtureTarget(MIXTURE),
        torch.Generator().manual_seed(1),
        num_samples=1000,
        chunk=250,
        step_counts=(2,),
    )
    assert quality["w2_ratio"] > 2
    assert quality["npe"] == pytest.approx(0.0, abs=1e-6)
