"""Gaussian mixtures with full covariances: the source p0 that every model samples from.

The same object validates a manifest's (or a training config's) `source`, draws start points with
a generator private to one request, and evaluates log p0 for likelihoods. Only torch is needed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


def _matrix(value: Any, field: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{field}: not a numeric array ({exc})") from None
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{field}: contains NaN or infinity")
    return tensor


@dataclass(frozen=True)
class _Placed:
    """A mixture's tensors on one device, moved there once."""

    weights: torch.Tensor
    means: torch.Tensor
    chol: torch.Tensor
    scale: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """sum_k w_k N(mean_k, cov_k) in d dimensions.

    means: (k, d), covs: (k, d, d), weights: (k,) summing to 1, all float64 on the CPU.
    """

    means: torch.Tensor
    covs: torch.Tensor
    weights: torch.Tensor
    chol: torch.Tensor = dataclasses.field(init=False, repr=False)  # (k, d, d), computed once
    scale: torch.Tensor | None = dataclasses.field(init=False, repr=False)
    """(k, d): the diagonal of `chol` when every covariance is diagonal, else None."""
    _placed: dict[torch.device, _Placed] = dataclasses.field(
        init=False, repr=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        chol = torch.linalg.cholesky(self.covs)
        object.__setattr__(self, "chol", chol)
        diagonal = bool((chol == torch.diag_embed(chol.diagonal(dim1=1, dim2=2))).all())
        object.__setattr__(self, "scale", chol.diagonal(dim1=1, dim2=2) if diagonal else None)

    @classmethod
    def from_spec(cls, spec: Any, field: str = "source") -> GaussianMixture:
        """Validate `{"means", "covs", "weights"}`; raise ValueError naming `field.<key>`."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"{field}: expected an object with means, covs and weights")
        missing = [key for key in ("means", "covs", "weights") if key not in spec]
        if missing:
            raise ValueError(f"{field}: missing {', '.join(missing)}")
        unknown = sorted(set(spec) - {"means", "covs", "weights"})
        if unknown:
            raise ValueError(f"{field}: unknown field(s) {', '.join(unknown)}")
        means = _matrix(spec["means"], f"{field}.means")
        if means.ndim != 2 or means.shape[0] == 0 or means.shape[1] == 0:
            raise ValueError(f"{field}.means: expected a non-empty list of points, shape (k, d)")
        k, d = means.shape
        covs = _matrix(spec["covs"], f"{field}.covs")
        if covs.shape != (k, d, d):
            raise ValueError(
                f"{field}.covs: expected {k} matrices of {d} x {d}, got shape {tuple(covs.shape)}"
            )
        weights = _matrix(spec["weights"], f"{field}.weights")
        if weights.shape != (k,):
            raise ValueError(
                f"{field}.weights: expected {k} weights, got shape {tuple(weights.shape)}"
            )
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"{field}.weights: must be non-negative and not all zero")
        for i in range(k):
            if not torch.allclose(covs[i], covs[i].T, rtol=1e-6, atol=1e-9):
                raise ValueError(f"{field}.covs[{i}]: not symmetric")
            if torch.linalg.cholesky_ex(covs[i]).info != 0:
                raise ValueError(f"{field}.covs[{i}]: not positive definite")
        return cls(means=means, covs=covs, weights=weights / weights.sum())

    def to_spec(self) -> dict[str, list]:
        return {
            "means": self.means.tolist(),
            "covs": self.covs.tolist(),
            "weights": self.weights.tolist(),
        }

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    def sample(
        self,
        n: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw (n, d) points on `generator`'s device; one generator state, one set of points.

        Computed in float64: mean_k + L_k z, z ~ N(0, I), for a component k drawn by weight.
        With diagonal covariances L_k z is z * diag(L_k), the same numbers in fewer operations
        (each product is rounded once either way, the other terms are exact zeros): the engine
        draws the start points of every seeded request on its own thread."""
        device = torch.device(device)
        placed = self._placed.get(device)
        if placed is None:
            placed = self._placed[device] = _Placed(
                self.weights.to(device),
                self.means.to(device),
                self.chol.to(device),
                None if self.scale is None else self.scale.to(device),
            )
        component = torch.multinomial(placed.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, device=device, dtype=torch.float64)
        if placed.scale is None:
            points = (placed.chol[component] @ noise.unsqueeze(-1)).squeeze(-1)
        elif self.num_components == 1:  # the common source: no per-row lookups
            points = noise.mul_(placed.scale[0])
        else:
            points = noise.mul_(placed.scale[component])
        points += placed.means[0] if self.num_components == 1 else placed.means[component]
        return points.to(dtype)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for x: (n, d); returns (n,) in x's dtype (computed in float64)."""
        x64 = x.to(torch.float64)
        means = self.means.to(x.device)
        chol = self.chol.to(x.device)
        diff = (x64[:, None, :] - means[None]).unsqueeze(-1)  # (n, k, d, 1)
        solved = torch.linalg.solve_triangular(chol[None], diff, upper=False).squeeze(-1)
        mahalanobis = (solved**2).sum(-1)  # (n, k)
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (k,)
        log_norm = -0.5 * (self.dim * math.log(2 * math.pi) + log_det)
        terms = torch.log(self.weights.to(x.device))[None] + log_norm[None] - 0.5 * mahalanobis
        return torch.logsumexp(terms, dim=1).to(x.dtype)
