import math

import numpy as np
import pytest
import torch

from training.datasets import (
    DATASETS,
    DatasetTarget,
    PointCloudTarget,
    load_points,
    make_dataset,
)


def draw(name, n=20_000, noise=None, seed=0):
    return make_dataset(name, n, torch.Generator().manual_seed(seed), noise)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_shape_dtype_and_seeding(name):
    points = draw(name, n=500)
    assert points.shape == (500, 2) and points.dtype == torch.float32
    assert torch.isfinite(points).all()
    assert torch.equal(points, draw(name, n=500))
    assert not torch.equal(points, draw(name, n=500, seed=1))


def test_eight_gaussians_modes():
    points = draw("8gaussians", noise=0.1).double()
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    means = 4 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    nearest = torch.cdist(points, means).argmin(dim=1)
    for k in range(8):
        members = points[nearest == k]
        assert len(members) / len(points) == pytest.approx(1 / 8, abs=0.01)
        torch.testing.assert_close(members.mean(0), means[k], atol=0.01, rtol=0)
        assert members.std(0).tolist() == pytest.approx([0.1, 0.1], abs=0.01)


def test_circles_radii():
    radius = torch.linalg.norm(draw("circles", noise=0.0), dim=1)
    assert set(torch.round(radius, decimals=4).unique().tolist()) == {2.0, 4.0}
    assert float((radius > 3).double().mean()) == pytest.approx(0.5, abs=0.015)


def test_moons_are_centred_with_two_halves():
    points = draw("moons", noise=0.0).double()
    torch.testing.assert_close(
        points.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.03, rtol=0
    )
    # Upper moon: unit circle about (-0.5, -0.25) scaled by 2; lower: about (0.5, 0.25).
    upper = torch.linalg.norm(points / 2 - torch.tensor([-0.5, -0.25]), dim=1)
    lower = torch.linalg.norm(points / 2 - torch.tensor([0.5, 0.25]), dim=1)
    on_a_moon = torch.minimum((upper - 1).abs(), (lower - 1).abs())
    assert float(on_a_moon.max()) < 1e-6


def test_checkerboard_fills_dark_squares_only():
    points = draw("checkerboard").double()
    assert float(points.abs().max()) <= 4.0
    col, row = torch.floor((points[:, 0] + 4) / 2), torch.floor((points[:, 1] + 4) / 2)
    assert bool(((col + row) % 2 == 0).all())
    assert float(points.var(0).mean()) == pytest.approx(16 / 3, rel=0.05)


def test_spirals_radius_follows_angle():
    points = draw("spirals", noise=0.0).double()
    torch.testing.assert_close(
        points.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.05, rtol=0
    )
    assert float(torch.linalg.norm(points, dim=1).max()) <= 4.0 + 1e-6
    # Point symmetry: the two arms are each other's rotation by pi.
    assert float(points[:, 0].mean().abs() + points[:, 1].mean().abs()) < 0.1


def test_noise_is_gaussian_jitter():
    clean, noisy = draw("circles", noise=0.0), draw("circles", noise=0.3)
    assert float((noisy - clean).std()) > 0.2


def test_fixed_pool():
    target = DatasetTarget("moons", size=50, seed=3)
    g = torch.Generator().manual_seed(0)
    batch = target.sample(1000, g)
    assert len(torch.unique(batch, dim=0)) <= 50
    assert target.spec() == {"dataset": "moons", "noise": 0.1, "size": 50}


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_load_points(tmp_path, suffix):
    array = np.arange(12, dtype=np.float64).reshape(4, 3)
    path = tmp_path / f"points{suffix}"
    if suffix == ".npy":
        np.save(path, array)
    else:
        path.write_text("a,b,c\n" + "\n".join(",".join(map(str, row)) for row in array) + "\n")
    points = load_points(path)
    torch.testing.assert_close(points, torch.from_numpy(array).float())
    target = PointCloudTarget(points, str(path))
    assert target.dim == 3 and target.sample(10, torch.Generator()).shape == (10, 3)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("ragged.csv", "1,2\n3,4\n5\n", "ragged: line 3 has 1 values, expected 2"),
        ("nan.csv", "1,2\n3,nan\n", "row 2 contains NaN or infinity"),
        ("inf.csv", "1,2\n3,4\ninf,1\n", "row 3 contains NaN or infinity"),
        ("words.csv", "x,y\n1,2\nfoo,3\n", "line 3: not a number in 'foo,3'"),
        ("empty.csv", "", "expected one point per row (a non-empty 2-D array), got shape (0, 0)"),
        ("bad.npy", "not a numpy file", "cannot read"),
        ("points.txt", "1,2\n", "expected a .npy or .csv file"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        load_points(path)
    text = str(info.value)
    assert text.startswith(f"target.file: {path}: ") and message in text and "\n" not in text


def test_missing_and_non_finite_npy(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read \(No such file or directory\)$"):
        load_points(tmp_path / "missing.npy")
    path = tmp_path / "nan.npy"
    np.save(path, np.array([[1.0, 2.0], [np.nan, 0.0]]))
    with pytest.raises(ValueError, match=r"row 2 contains NaN or infinity$"):
        load_points(path)
    np.save(path, np.zeros(5))
    with pytest.raises(ValueError, match=r"got shape \(5,\)$"):
        load_points(path)
