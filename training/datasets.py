"""Target distributions q(x1) that the trainer draws minibatches from.

Four kinds, one interface (`dim`, `sample(n, generator) -> (n, dim) float32` on the CPU,
`spec()` for the manifest):

- `MixtureTarget`: a Gaussian mixture of any dimension (the shared `service.mixture` maths).
- `DatasetTarget`: a built-in 2-D toy set (`DATASETS`), drawn fresh every batch, or from a fixed
  pool of `size` points when `size` is given.
- `PointCloudTarget`: the rows of a user's .npy or .csv file, drawn with replacement.
- `LabelledTarget`: labelled samples of any shape (scikit-learn's 8 x 8 digits, or a user's
  .npz with arrays `x` (n, *shape) and `y` (n,)), split once into a training part, which batches
  are drawn from, and a held-out part, which only the self-score reads.

All randomness comes from the torch generator passed in, so a seed fixes every batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from service.mixture import GaussianMixture

Generator = Callable[[int, torch.Generator, float], torch.Tensor]


def _moons(n: int, g: torch.Generator, noise: float) -> torch.Tensor:
    """Two interleaving half circles of radius 2, centred on the origin."""
    upper = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
    angle = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle)) - 0.5
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle)) - 0.25
    return 2 * torch.stack([x, y], dim=1)


def _circles(n: int, g: torch.Generator, noise: float) -> torch.Tensor:
    """Two concentric circles of radii 4 and 2, half the points on each."""
    radius = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.5, 4.0, 2.0)
    angle = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    return radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)


def _eight_gaussians(n: int, g: torch.Generator, noise: float) -> torch.Tensor:
    """Eight equal modes at radius 4, at angles k * 45 degrees (noise is added by the caller)."""
    k = torch.randint(0, 8, (n,), generator=g)
    angle = k.to(torch.float64) * (math.pi / 4)
    return 4 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)


def _checkerboard(n: int, g: torch.Generator, noise: float) -> torch.Tensor:
    """Uniform on the 8 dark squares of a 4 x 4 board of side 2 on [-4, 4]^2.

    A square (i, j), i, j in 0..3 counted from the lower left corner, is dark when i + j is even.
    """
    cell = torch.randint(0, 8, (n,), generator=g)
    row = cell // 2
    col = 2 * (cell % 2) + row % 2
    offset = 2 * torch.rand(n, 2, generator=g, dtype=torch.float64)
    corner = torch.stack([col, row], dim=1).to(torch.float64) * 2 - 4
    return corner + offset


def _spirals(n: int, g: torch.Generator, noise: float) -> torch.Tensor:
    """Two interleaved arms r = 4 * theta / (3 pi), theta in [0, 3 pi], the second rotated by pi."""
    theta = 3 * math.pi * torch.sqrt(torch.rand(n, generator=g, dtype=torch.float64))
    sign = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.5, 1.0, -1.0)
    radius = 4 * theta / (3 * math.pi)
    return sign[:, None] * radius[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], 1)


DATASETS: dict[str, tuple[Generator, float]] = {
    "moons": (_moons, 0.1),
    "circles": (_circles, 0.1),
    "8gaussians": (_eight_gaussians, 0.3),
    "checkerboard": (_checkerboard, 0.0),
    "spirals": (_spirals, 0.15),
}
"""name -> (generator without noise, default noise: std of the Gaussian jitter added)."""


def make_dataset(name: str, n: int, generator: torch.Generator, noise: float | None = None):
    """n points of a built-in set: (n, 2) float32, with Gaussian jitter of std `noise`."""
    if name not in DATASETS:
        raise ValueError(f"target.dataset: unknown {name!r}; choose one of {', '.join(DATASETS)}")
    make, default_noise = DATASETS[name]
    noise = default_noise if noise is None else noise
    points = make(n, generator, noise)
    if noise > 0:
        points = points + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return points.to(torch.float32)


class Target(Protocol):
    dim: int

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor: ...

    def spec(self) -> dict[str, Any]: ...


class MixtureTarget:
    def __init__(self, mixture: GaussianMixture):
        self.mixture = mixture
        self.dim = mixture.dim

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.mixture.sample(n, generator)

    def spec(self) -> dict[str, Any]:
        return self.mixture.to_spec()


class DatasetTarget:
    def __init__(
        self, name: str, noise: float | None = None, size: int | None = None, seed: int = 0
    ):
        self.name = name
        self.noise = DATASETS[name][1] if noise is None else noise
        self.size = size
        self.dim = 2
        self._pool = None
        if size is not None:
            pool_generator = torch.Generator().manual_seed(seed)
            self._pool = make_dataset(name, size, pool_generator, self.noise)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self._pool is None:
            return make_dataset(self.name, n, generator, self.noise)
        return self._pool[torch.randint(0, len(self._pool), (n,), generator=generator)]

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"dataset": self.name, "noise": self.noise}
        if self.size is not None:
            spec["size"] = self.size
        return spec


class PointCloudTarget:
    """The rows of `points` (n, d), drawn uniformly with replacement."""

    def __init__(self, points: torch.Tensor, path: str):
        self.points = points
        self.path = path
        self.dim = int(points.shape[1])

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.points[torch.randint(0, len(self.points), (n,), generator=generator)]

    def spec(self) -> dict[str, Any]:
        return {"file": self.path, "points": len(self.points)}


def _read_csv(path: Path) -> np.ndarray:
    rows: list[list[float]] = []
    width = None
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            cells = (
                line.replace(";", ",").split(",") if "," in line or ";" in line else line.split()
            )
            try:
                row = [float(cell) for cell in cells]
            except ValueError:
                if not rows and width is None:
                    width = -1  # a header line: skipped, but only as the first line
                    continue
                raise ValueError(f"line {line_number}: not a number in {line.strip()!r}") from None
            if width not in (None, -1) and len(row) != width:
                raise ValueError(
                    f"ragged: line {line_number} has {len(row)} values, expected {width}"
                )
            width = len(row)
            rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), width if rows else 0)


def load_points(path: str | Path, field: str = "target.file") -> torch.Tensor:
    """Read one point per row from .npy or .csv: (n, d) float32, checked finite and non-empty."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise ValueError(f"{field}: {path}: expected a .npy or .csv file")
    try:
        if suffix == ".npy":
            try:
                array = np.load(path, allow_pickle=False)
            except (ValueError, EOFError):
                raise OSError(0, "not a valid .npy file of numbers") from None
        else:
            array = _read_csv(path)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"{field}: {path}: cannot read ({reason})") from None
    except ValueError as exc:
        raise ValueError(f"{field}: {path}: {exc}") from None
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{field}: {path}: expected numbers, got dtype {array.dtype}")
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(
            f"{field}: {path}: expected one point per row (a non-empty 2-D array), "
            f"got shape {array.shape}"
        )
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite)) + 1
        raise ValueError(f"{field}: {path}: row {row} contains NaN or infinity")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


LABELLED_DATASETS = ("digits",)
SPLIT_SEED = 0
"""The hold-out split does not depend on the training seed, so scores of runs compare."""


class LabelledTarget:
    """Labelled samples: x (n, dim) float32 (flattened from (n, *shape)), y (n,) int64 indices
    into `classes`. `holdout` of them (a seeded split, stratified by nothing but chance) are kept
    out of training for the self-score; batches are drawn with replacement from the rest."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        shape: tuple[int, ...],
        classes: tuple[str, ...],
        data_range: tuple[float, float],
        spec: dict[str, Any],
        holdout: float = 0.2,
    ):
        self.shape = shape
        self.classes = classes
        self.data_range = data_range
        self.dim = int(x.shape[1])
        self.holdout = holdout
        self._spec = spec
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
        held = round(holdout * len(x))
        self.held_x, self.held_y = x[order[:held]], y[order[:held]]
        self.train_x, self.train_y = x[order[held:]], y[order[held:]]

    def sample_labelled(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, dim) training samples and their (n,) labels, drawn with replacement."""
        index = torch.randint(0, len(self.train_x), (n,), generator=generator)
        return self.train_x[index], self.train_y[index]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.sample_labelled(n, generator)[0]

    def spec(self) -> dict[str, Any]:
        return {
            **self._spec,
            "shape": list(self.shape),
            "classes": len(self.classes),
            "train": len(self.train_x),
            "held_out": len(self.held_x),
        }


def load_digits_target(holdout: float = 0.2) -> LabelledTarget:
    """scikit-learn's bundled 8 x 8 handwritten digits (1,797 images, grey levels 0-16), as
    (1, 8, 8) images scaled to [-1, 1]; classes "0" .. "9"."""
    from sklearn.datasets import load_digits  # only this target needs scikit-learn's data

    digits = load_digits()
    x = torch.from_numpy(digits.images.reshape(len(digits.images), -1) / 8.0 - 1.0).float()
    y = torch.from_numpy(digits.target).long()
    return LabelledTarget(
        x,
        y,
        shape=(1, 8, 8),
        classes=tuple(str(k) for k in range(10)),
        data_range=(-1.0, 1.0),
        spec={"dataset": "digits"},
        holdout=holdout,
    )


def load_labelled_file(path: Path, spec_path: str, holdout: float = 0.2) -> LabelledTarget:
    """A user's .npz with `x` (n, *shape) numbers, `y` (n,) integer labels 0 .. k-1 and, optionally,
    `classes` (k,) names; ValueError naming the file and what is wrong."""
    field = "target.file"
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"{field}: {path}: cannot read ({reason})") from None
    with archive:
        missing = [key for key in ("x", "y") if key not in archive.files]
        if missing:
            raise ValueError(f"{field}: {path}: missing array(s) {', '.join(missing)}")
        x, y = archive["x"], archive["y"]
        names = archive["classes"] if "classes" in archive.files else None
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"{field}: {path}: x must hold numbers of shape (n, ...), n >= 2")
    if not np.isfinite(x).all():
        raise ValueError(f"{field}: {path}: x contains NaN or infinity")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
        raise ValueError(f"{field}: {path}: y must be {x.shape[0]} integer labels")
    if y.min() < 0:
        raise ValueError(f"{field}: {path}: y holds a negative label")
    count = int(y.max()) + 1
    if names is not None:
        if names.shape != (len(names),) or len(names) < count:
            raise ValueError(f"{field}: {path}: classes must name every label 0 .. {count - 1}")
        classes = tuple(str(name) for name in names)
    else:
        classes = tuple(str(k) for k in range(count))
    flat = torch.from_numpy(np.ascontiguousarray(x.reshape(x.shape[0], -1), dtype=np.float32))
    return LabelledTarget(
        flat,
        torch.from_numpy(y.astype(np.int64)),
        shape=tuple(int(s) for s in x.shape[1:]),
        classes=classes,
        data_range=(float(x.min()), max(float(x.max()), float(x.min()) + 1.0)),
        spec={"file": spec_path},
        holdout=holdout,
    )
