"""The trainer's self-score: how close generated samples are to the target, per step count.

- `w2`: the exact 2-Wasserstein distance between two equal-size clouds with uniform weights,
  whose optimal plan is a permutation (an assignment problem on squared Euclidean cost).
- The floor: the same figure between two independent target draws of the same size; what a
  perfect model would score. W2 / floor is the headline (1.0 is perfect). At 2,000 points a
  single draw of the floor moves by about 25% (it is dominated by how many points land in each
  mode), so the floor is averaged over `FLOOR_DRAWS` draws from a generator of its own: it
  depends on the target only, and is computed once per target and chunk size. Every W2 figure
  is reported with its spread over the chunks it averages.
- `off_mode_share`: for mixture targets, the share of samples outside every component's 99%
  ellipse (squared Mahalanobis distance past the chi-square 0.99 quantile), beside the target's
  own share (about 1%): mass between the modes, which W2 at a few thousand points hardly sees.
- `mode_stats`: for mixture targets, each mode's share of samples (nearest mean) and the error
  of each mode's sample mean and covariance.
- `path_energy` / NPE: normalised path energy |E[int ||v||^2 dt] - W2^2| / W2^2 along generated
  paths, with W2 between each path's start and end clouds; 0 for straight optimal paths.

For labelled targets (`score_labelled`), at each guidance scale w:
- accuracy: a logistic-regression classifier fitted on the training split scores generated
  samples against the label they were asked for (overall and per class); its accuracy on the
  held-out split says how far to trust it.
- Frechet distance in pixel space between generated samples and the held-out split, divided by
  the same distance between the training split and the held-out split (the floor): 1 means the
  samples are as close to unseen data as the training data is.
- memorisation: the mean distance from each generated sample to its nearest training sample,
  divided by the same for held-out samples; below 1 means samples sit closer to the training
  set than unseen data does (copies).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy import linalg, stats
from scipy.optimize import linear_sum_assignment

from service.mixture import GaussianMixture
from service.solvers import Field, integrate

STEP_COUNTS = (1, 2, 4, 8, 16, 100)
"""Euler step counts in the quality table; the last one is the headline."""
FLOOR_DRAWS = 20
FLOOR_SEED = 20_240_531
OFF_MODE_QUANTILE = 0.99
_FLOORS: dict[tuple[str, int, int], tuple[float, float]] = {}


def w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact W2 between the uniform clouds a and b, both (n, d)."""
    if a.shape != b.shape:
        raise ValueError(
            f"w2: clouds must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    cost = torch.cdist(a.double().cpu(), b.double().cpu()).square_().numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean()) ** 0.5


def chunked_w2(samples: torch.Tensor, reference: torch.Tensor, chunk: int) -> list[float]:
    """`w2` of each pair of consecutive chunks of `chunk` rows; samples, reference: (m chunk, d).
    The chunks are solved on every core (scipy's assignment solver releases the GIL)."""
    starts = range(0, len(samples) - chunk + 1, chunk)
    return _on_every_core([(samples[i : i + chunk], reference[i : i + chunk]) for i in starts])


def _on_every_core(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """`w2` of each pair, in order, on a thread per core."""
    if len(pairs) < 2:
        return [w2(a, b) for a, b in pairs]
    with ThreadPoolExecutor(min(len(pairs), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda pair: w2(*pair), pairs))


def mean_w2(samples: torch.Tensor, reference: torch.Tensor, chunk: int) -> float:
    """Mean `w2` over consecutive chunks of `chunk` rows; samples, reference: (m * chunk, d)."""
    pieces = chunked_w2(samples, reference, chunk)
    return sum(pieces) / len(pieces)


def w2_floor(target, chunk: int, draws: int = FLOOR_DRAWS) -> tuple[float, float]:
    """(mean, standard deviation) of `w2` between two independent target draws of `chunk`
    points, over `draws` draws from a generator of its own: a function of the target alone,
    computed once per target spec, chunk and draw count in a process."""
    key = (json.dumps(target.spec(), sort_keys=True), chunk, draws)
    if key not in _FLOORS:
        generator = torch.Generator().manual_seed(FLOOR_SEED)
        pieces = _on_every_core(
            [
                (target.sample(chunk, generator), target.sample(chunk, generator))
                for _ in range(draws)
            ]
        )
        _FLOORS[key] = (float(np.mean(pieces)), float(np.std(pieces)))
    return _FLOORS[key]


def off_mode_share(samples: torch.Tensor, mixture: GaussianMixture) -> float:
    """Share of samples (n, d) outside every component's OFF_MODE_QUANTILE ellipse."""
    x = samples.double().cpu()
    diff = (x[:, None, :] - mixture.means[None]).unsqueeze(-1)  # (n, k, d, 1)
    solved = torch.linalg.solve_triangular(mixture.chol[None], diff, upper=False).squeeze(-1)
    mahalanobis = (solved**2).sum(-1)  # (n, k)
    limit = stats.chi2.ppf(OFF_MODE_QUANTILE, mixture.dim)
    return float((mahalanobis.min(dim=1).values > limit).double().mean())


def path_energy(
    field: Field, x0: torch.Tensor, num_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler-integrate from x0 (n, d); return (x1 (n, d), int ||v||^2 dt per path (n,))."""
    energy = torch.zeros(len(x0), dtype=torch.float64, device=x0.device)

    def recording(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        v = field(t, x)
        energy.add_(v.double().square().sum(dim=1), alpha=1.0 / num_steps)
        return v

    return integrate(recording, x0, num_steps, "euler"), energy


def npe(field: Field, x0: torch.Tensor, num_steps: int = 100, chunk: int = 2000) -> float | None:
    """Normalised path energy of the Euler paths from x0 (n, d), n a multiple of `chunk`.

    None (JSON null) when the paths end where they start (W2 = 0) but still move.
    """
    x1, energy = path_energy(field, x0, num_steps)
    w2_squared = [
        w2(x0[i : i + chunk], x1[i : i + chunk]) ** 2 for i in range(0, len(x0) - chunk + 1, chunk)
    ]
    optimal = sum(w2_squared) / len(w2_squared)
    if optimal == 0.0:
        return 0.0 if float(energy.mean()) == 0.0 else None
    return abs(float(energy.mean()) - optimal) / optimal


def mode_stats(samples: torch.Tensor, mixture: GaussianMixture) -> list[dict]:
    """Per mode k of `mixture`: share of samples nearest to mean k, and the errors of their mean
    (Euclidean norm) and covariance (Frobenius norm). samples: (n, d).

    Keys: "mean" (the mode's mean), "weight" (its mixture weight), "share", "mean_error",
    "cov_error" (None, JSON null, for a mode with fewer than two samples).
    """
    x = samples.double().cpu()
    nearest = torch.cdist(x, mixture.means).argmin(dim=1)
    stats = []
    for k in range(mixture.num_components):
        members = x[nearest == k]
        entry = {
            "mean": mixture.means[k].tolist(),
            "weight": float(mixture.weights[k]),
            "share": len(members) / len(x),
            "mean_error": None,
            "cov_error": None,
        }
        if len(members) >= 2:
            entry["mean_error"] = float(torch.linalg.norm(members.mean(0) - mixture.means[k]))
            entry["cov_error"] = float(torch.linalg.norm(members.T.cov() - mixture.covs[k]))
        stats.append(entry)
    return stats


@torch.no_grad()
def score(
    field: Field,
    source: GaussianMixture,
    target,
    generator: torch.Generator,
    *,
    num_samples: int = 10_000,
    chunk: int = 2000,
    step_counts: tuple[int, ...] = STEP_COUNTS,
    floor_draws: int = FLOOR_DRAWS,
    device: torch.device | str = "cpu",
    on_stage=None,
) -> dict:
    """The "quality" block of the manifest.

    Draws `num_samples` start points and integrates them with Euler at each of `step_counts`;
    W2 figures average `num_samples // chunk` assignments of `chunk` points against fresh target
    draws, over the floor of `w2_floor`. Keys: "num_samples", "chunk", "w2_floor",
    "w2_floor_sd", "floor_draws", "by_steps" {"K": {"w2", "w2_sd", "w2_ratio", "w2_ratio_sd",
    and for mixtures "off_mode_share"}}, "w2" and "w2_ratio" (at the largest K), "npe" (along
    the largest-K paths), and for mixture targets "modes" (`mode_stats` at the largest K) and
    "target_off_mode_share". on_stage(text) is told what is being scored.
    """
    if num_samples < chunk:
        raise ValueError(f"num_samples: must be at least chunk ({chunk}), got {num_samples}")
    say = on_stage or (lambda _text: None)
    say(f"scoring: the W2 floor of the target ({floor_draws} draws of {chunk} points)")
    floor, floor_sd = w2_floor(target, chunk, floor_draws)
    x0 = source.sample(num_samples, generator).to(device)
    mixture = getattr(target, "mixture", None)
    say(f"scoring: W2 at {', '.join(map(str, step_counts))} Euler steps ({num_samples} points)")
    by_steps = {}
    final = None
    for k in step_counts:
        final = integrate(field, x0, k, "euler").cpu()
        pieces = chunked_w2(final, target.sample(num_samples, generator), chunk)
        distance, spread = float(np.mean(pieces)), float(np.std(pieces))
        row = {
            "w2": distance,
            "w2_sd": spread,
            "w2_ratio": distance / floor,
            "w2_ratio_sd": spread / floor,
        }
        if mixture is not None:
            row["off_mode_share"] = off_mode_share(final, mixture)
        by_steps[str(k)] = row
    headline = by_steps[str(step_counts[-1])]
    say("scoring: path energy")
    quality = {
        "num_samples": num_samples,
        "chunk": chunk,
        "floor_draws": floor_draws,
        "w2": headline["w2"],
        "w2_floor": floor,
        "w2_floor_sd": floor_sd,
        "w2_ratio": headline["w2_ratio"],
        "by_steps": by_steps,
        "npe": npe(field, x0, step_counts[-1], chunk),
    }
    if mixture is not None:
        quality["modes"] = mode_stats(final, mixture)
        quality["target_off_mode_share"] = off_mode_share(
            target.sample(num_samples, generator), mixture
        )
    return quality


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to a (n, d) and
    b (m, d), in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr (S_a S_b)^(1/2) = tr (S_a^(1/2) S_b S_a^(1/2))^(1/2), a symmetric PSD matrix: its
    # eigenvalues give the trace without the general square root, which is ill-conditioned for
    # the singular covariances of pixels that never change.
    values, vectors = linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace = np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + trace)


def nearest_distance(points: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(n,) Euclidean distance from each of points (n, d) to its nearest row of reference."""
    return torch.cdist(points.double(), reference.double()).min(dim=1).values


@torch.no_grad()
def score_labelled(
    field,
    source: GaussianMixture,
    target,
    generator: torch.Generator,
    *,
    scales: tuple[float, ...],
    num_steps: int = 100,
    draws: int = 3,
    on_stage=None,
) -> dict:
    """The "quality" block of a class-conditional model's manifest.

    field: a `service.field.VelocityField` over the trained network. At each scale w of `scales`,
    `draws` times: as many samples as the training split holds, asked for the training split's
    labels, integrated with `num_steps` Euler steps from the source. Figures are the mean over
    draws, with their standard deviation ("sd"). on_stage(text) is told what is being scored.
    """
    from sklearn.linear_model import LogisticRegression  # fitted in a second or two

    train_x, train_y = target.train_x, target.train_y
    held_x, held_y = target.held_x, target.held_y
    say = on_stage or (lambda _text: None)
    say("scoring: fitting the classifier on the training split")
    classifier = LogisticRegression(max_iter=5000).fit(train_x.numpy(), train_y.numpy())
    floor = frechet_distance(train_x.numpy(), held_x.numpy())
    held_nearest = float(nearest_distance(held_x, train_x).mean())
    labels = train_y.to(torch.float32).unsqueeze(1)
    count = len(target.classes)
    by_scale = {}
    for w in scales:
        say(f"scoring: {draws} draws of {len(train_x)} samples at guidance {w:g}")
        rows: dict[str, list[float]] = {"accuracy": [], "fd": [], "fd_ratio": [], "nn_ratio": []}
        per_class = np.zeros(count)
        for _ in range(draws):
            x0 = source.sample(len(train_x), generator)
            scale = None if w == 1 else torch.full((len(train_x), 1), float(w))
            samples = integrate(
                lambda t, x, scale=scale: field(t, x, labels, scale), x0, num_steps, "euler"
            )
            predicted = classifier.predict(samples.numpy())
            hits = predicted == train_y.numpy()
            rows["accuracy"].append(float(hits.mean()))
            per_class += np.array([hits[train_y.numpy() == k].mean() for k in range(count)]) / draws
            distance = frechet_distance(samples.numpy(), held_x.numpy())
            rows["fd"].append(distance)
            rows["fd_ratio"].append(distance / floor)
            nearest = float(nearest_distance(samples, train_x).mean())
            rows["nn_ratio"].append(nearest / held_nearest)
        entry = {}
        for key, values in rows.items():
            entry[key] = float(np.mean(values))
            entry[f"{key}_sd"] = float(np.std(values))
        entry["per_class_accuracy"] = {
            name: float(value) for name, value in zip(target.classes, per_class, strict=True)
        }
        by_scale[f"{w:g}"] = entry
    return {
        "num_samples": len(train_x),
        "draws": draws,
        "num_steps": num_steps,
        "classifier": "logistic regression on the training split",
        "classifier_held_out_accuracy": float(classifier.score(held_x.numpy(), held_y.numpy())),
        "fd_floor": floor,
        "held_out_nearest": held_nearest,
        "by_guidance": by_scale,
    }
