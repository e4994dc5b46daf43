"""service.mixture.GaussianMixture: validation messages, sampling statistics, log_prob."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from service.mixture import GaussianMixture

TWO = {
    "means": [[-2.0, 1.0], [3.0, 0.0]],
    "covs": [[[1.0, 0.6], [0.6, 2.0]], [[0.5, -0.2], [-0.2, 0.3]]],
    "weights": [1.0, 3.0],
}
"""Two components with full covariances; the weights normalise to 0.25 / 0.75."""


def moments(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a mixture from its spec (normalised weights)."""
    w = np.asarray(spec["weights"], dtype=float)
    w = w / w.sum()
    mu, cov = np.asarray(spec["means"], dtype=float), np.asarray(spec["covs"], dtype=float)
    mean = w @ mu
    second = np.einsum("k,kij->ij", w, cov + np.einsum("ki,kj->kij", mu, mu))
    return mean, second - np.outer(mean, mean)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([1, 2], "source: expected an object with means, covs and weights"),
        ({"means": [[0.0]], "covs": [[[1.0]]]}, "source: missing weights"),
        ({"means": [[0.0]]}, "source: missing covs, weights"),
        (
            {"means": [[0.0]], "covs": [[[1.0]]], "weights": [1.0], "mean": 0},
            "source: unknown field(s) mean",
        ),
        ({"means": "abc", "covs": [[[1.0]]], "weights": [1.0]}, "source.means: not a numeric"),
        (
            {"means": [[float("nan")]], "covs": [[[1.0]]], "weights": [1.0]},
            "source.means: contains NaN or infinity",
        ),
        (
            {"means": [0.0, 1.0], "covs": [[[1.0]]], "weights": [1.0]},
            "source.means: expected a non-empty list of points, shape (k, d)",
        ),
        (
            {"means": [[0.0, 0.0]], "covs": [[[1.0]]], "weights": [1.0]},
            "source.covs: expected 1 matrices of 2 x 2, got shape (1, 1, 1)",
        ),
        (
            {"means": [[0.0]], "covs": [[[1.0]]], "weights": [0.5, 0.5]},
            "source.weights: expected 1 weights, got shape (2,)",
        ),
        (
            {"means": [[0.0], [1.0]], "covs": [[[1.0]], [[1.0]]], "weights": [1.0, -0.5]},
            "source.weights: must be non-negative and not all zero",
        ),
        (
            {"means": [[0.0]], "covs": [[[1.0]]], "weights": [0.0]},
            "source.weights: must be non-negative and not all zero",
        ),
        (
            {"means": [[0.0, 0.0]], "covs": [[[1.0, 0.5], [0.0, 1.0]]], "weights": [1.0]},
            "source.covs[0]: not symmetric",
        ),
        (
            {"means": [[0.0, 0.0]], "covs": [[[1.0, 2.0], [2.0, 1.0]]], "weights": [1.0]},
            "source.covs[0]: not positive definite",
        ),
    ],
)
def test_invalid_specs_name_the_field(spec: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        GaussianMixture.from_spec(spec)
    assert str(info.value).startswith(message)


def test_the_field_prefix_is_the_callers() -> None:
    with pytest.raises(ValueError, match=r"^manifest\.json: source: missing weights$"):
        GaussianMixture.from_spec({"means": [[0.0]], "covs": [[[1.0]]]}, "manifest.json: source")


def test_weights_are_normalised_and_the_spec_round_trips() -> None:
    mixture = GaussianMixture.from_spec(TWO)
    assert (mixture.dim, mixture.num_components) == (2, 2)
    assert mixture.weights.tolist() == [0.25, 0.75]
    again = GaussianMixture.from_spec(mixture.to_spec())
    assert torch.equal(again.means, mixture.means)
    assert torch.equal(again.covs, mixture.covs)
    assert torch.equal(again.weights, mixture.weights)


def test_samples_follow_the_mixture_moments() -> None:
    mixture = GaussianMixture.from_spec(TWO)
    n = 40_000
    points = mixture.sample(n, torch.Generator().manual_seed(0)).numpy().astype(np.float64)
    assert points.shape == (n, 2)
    mean, cov = moments(TWO)
    # Standard errors of the mean and of each covariance entry (Gaussian approximation), 5 sigma.
    np.testing.assert_allclose(points.mean(0), mean, atol=5 * np.sqrt(np.diag(cov) / n).max())
    entry_se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    assert (np.abs(np.cov(points.T) - cov) < 6 * entry_se).all()
    # Component 1 (weight 0.75) owns the half-plane x > 0.5 almost entirely.
    share = (points[:, 0] > 0.5).mean()
    assert share == pytest.approx(0.75, abs=5 * math.sqrt(0.75 * 0.25 / n) + 0.005)


def test_samples_are_float32_and_reproducible_from_the_generator_alone() -> None:
    mixture = GaussianMixture.from_spec(TWO)
    a = mixture.sample(64, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global generator plays no part
    b = mixture.sample(64, torch.Generator().manual_seed(7))
    c = mixture.sample(64, torch.Generator().manual_seed(8))
    assert a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


DIAGONAL = {
    "means": [[-4.0, 4.0], [4.0, -4.0], [0.5, 0.0]],
    "covs": [[[0.3, 0.0], [0.0, 0.7]], [[1.5, 0.0], [0.0, 0.2]], [[1.0, 0.0], [0.0, 1.0]]],
    "weights": [1.0, 2.0, 1.0],
}
SINGLE = {"means": [[0.25, -1.0, 3.0]], "covs": [np.diag([0.5, 2.0, 0.1]).tolist()], "weights": [1]}


@pytest.mark.parametrize("spec", [TWO, DIAGONAL, SINGLE], ids=["full", "diagonal", "single"])
def test_draws_are_the_cholesky_formula_bit_for_bit(spec: dict) -> None:
    # Diagonal covariances take a shorter path; its numbers must be the general formula's, so a
    # seed keeps giving the same points.
    mixture = GaussianMixture.from_spec(spec)
    assert (mixture.scale is None) == (spec is TWO)
    for n in (1, 15, 16, 17, 1000):
        for seed in range(5):
            g = torch.Generator().manual_seed(seed)
            k = torch.multinomial(mixture.weights, n, replacement=True, generator=g)
            z = torch.randn(n, mixture.dim, 1, generator=g, dtype=torch.float64)
            expected = (mixture.means[k] + (mixture.chol[k] @ z).squeeze(-1)).float()
            drawn = mixture.sample(n, torch.Generator().manual_seed(seed))
            assert torch.equal(drawn, expected), (n, seed)


def test_log_prob_equals_scipy() -> None:
    mixture = GaussianMixture.from_spec(TWO)
    x = torch.tensor([[0.0, 0.0], [-2.0, 1.0], [3.1, -0.4], [10.0, -7.0], [1.0, 2.5]])
    weights = np.array(TWO["weights"]) / sum(TWO["weights"])
    densities = sum(
        w * multivariate_normal(mean=m, cov=c).pdf(x.numpy().astype(np.float64))
        for w, m, c in zip(weights, TWO["means"], TWO["covs"], strict=True)
    )
    got = mixture.log_prob(x.to(torch.float64)).numpy()
    np.testing.assert_allclose(got, np.log(densities), rtol=1e-10)
    assert mixture.log_prob(x).dtype == torch.float32


def test_log_prob_of_a_far_point_stays_finite() -> None:
    # A point where every density underflows to 0 in float64 still has a finite log density.
    mixture = GaussianMixture.from_spec(TWO)
    far = torch.tensor([[1e3, -1e3]], dtype=torch.float64)
    expected = max(
        multivariate_normal(mean=m, cov=c).logpdf(far.numpy()[0]) + math.log(w / 4)
        for m, c, w in zip(TWO["means"], TWO["covs"], TWO["weights"], strict=True)
    )
    assert mixture.log_prob(far).item() == pytest.approx(expected, rel=1e-9)
