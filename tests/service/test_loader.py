"""service.loader: a good folder loads; each bad one is refused with its reason, logged once."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import write_model_dir, write_module_dir

from service import fastpath
from service.loader import ModelRefused, load_model, load_models
from training.network import VelocityMLP

REPO_ROOT = Path(__file__).resolve().parents[2]

CPU = torch.device("cpu")


class FirstColumn(torch.nn.Module):
    """Returns (B, 1) for x of shape (B, d): the wrong output shape."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] + t


class Doubles(torch.nn.Module):
    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x + t).double()


class ThreeArguments(torch.nn.Module):
    def forward(self, t: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x + c


class Raises(torch.nn.Module):
    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, t)  # (B, d) @ (B, 1) fails for B != d


def edit_manifest(folder: Path, **changes: object) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key)
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))


def rehash(folder: Path) -> None:
    digest = hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    edit_manifest(folder, sha256=digest)


def test_a_good_folder_loads(tmp_path: Path) -> None:
    folder = write_model_dir(tmp_path, "tiny", dim=3, a=0.5)
    model = load_model(folder, CPU)
    assert (model.name, model.dim, model.device) == ("tiny", 3, CPU)
    assert model.manifest == json.loads((folder / "manifest.json").read_text())
    assert model.source.dim == 3
    t, x = torch.rand(4, 1), torch.randn(4, 3)
    torch.testing.assert_close(model.field(t, x), 0.5 * x)
    torch.testing.assert_close(model.field.differentiable(t, x), 0.5 * x)


def test_the_bundled_model_is_served_fused_with_an_unfused_copy(monkeypatch) -> None:
    monkeypatch.setattr(fastpath, "_speedup", lambda *_: 2.0)  # whether it pays is timed
    model = load_model(REPO_ROOT / "models" / "four-gaussians", CPU)
    assert model.optimizations == ["freeze", "onednn"]
    assert model.field.small is not None
    # Eager PyTorch with the same weights: ATen's kernels, as the unfused graph runs them.
    eager = VelocityMLP(2, hidden=64, layers=3).eval()
    eager.load_state_dict(model.field.autograd.state_dict())
    t, x = torch.rand(300, 1), 3 * torch.randn(300, 2)
    with torch.no_grad():
        expected = eager(t, x)
        torch.testing.assert_close(model.field(t, x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.field.small(t, x), expected, rtol=0, atol=0)


def test_the_bundled_model_serves_every_row_count_from_copies_planned_for_powers_of_two(
    monkeypatch,
) -> None:
    monkeypatch.setattr(fastpath, "_speedup", lambda *_: 2.0)
    model = load_model(REPO_ROOT / "models" / "four-gaussians", CPU, fused_min_rows=128)
    field = model.field
    assert sorted(field.planned) == [128, 256, 512, 1024, 2048, 4096, 8192, 16_384]
    for rows, copy in field.planned.items():  # each was planned fused, for its own row count
        t, x = torch.rand(rows, 1), torch.randn(rows, 2)
        with torch.no_grad():
            copy(t, x)
        plan = str(torch.jit.last_executed_optimized_graph())
        assert fastpath.FUSION_GROUP in plan
        assert f"Float({rows}, " in plan
    eager = VelocityMLP(2, hidden=64, layers=3).eval()
    eager.load_state_dict(field.autograd.state_dict())
    for rows in (5, 127, 128, 300, 1008, 1040, 16_385):
        t, x = torch.rand(rows, 1), 3 * torch.randn(rows, 2)
        with torch.no_grad():
            torch.testing.assert_close(field(t, x), eager(t, x), rtol=1e-5, atol=1e-5)


def test_optimisation_can_be_turned_off(tmp_path: Path) -> None:
    model = load_model(write_model_dir(tmp_path, "tiny"), CPU, rewrites=())
    assert model.optimizations == []
    assert model.field.graph is model.field.autograd


def mutate_json(folder: Path) -> None:
    (folder / "manifest.json").write_text('{"format": 1, "name": ')


def tamper(folder: Path) -> None:
    with (folder / "model.pt").open("ab") as handle:
        handle.write(b"\0")


def not_torchscript(folder: Path) -> None:
    (folder / "model.pt").write_bytes(b"this is not a zip archive")
    rehash(folder)


def swap_module(module: torch.nn.Module) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        torch.jit.save(torch.jit.script(module), str(folder / "model.pt"))
        rehash(folder)

    return apply


def drop(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def manifest(**changes: object) -> Callable[[Path], None]:
    return lambda folder: edit_manifest(folder, **changes)


REFUSALS = [
    ("bad json", mutate_json, "manifest.json unreadable: Expecting value: line 1 column 23"),
    ("no manifest", drop("manifest.json"), "no manifest.json"),
    ("not an object", lambda f: (f / "manifest.json").write_text("[1]"), "manifest.json: not a"),
    ("missing fields", manifest(dim=None, sha256=None), "manifest.json: missing dim, sha256"),
    ("format", manifest(format=2), "manifest.json: format 2 is not 1"),
    (
        "name mismatch",
        manifest(name="other"),
        "manifest.json: name 'other' differs from the folder name",
    ),
    ("dim", manifest(dim=0), "manifest.json: dim must be a positive integer, got 0"),
    ("dim type", manifest(dim="2"), "manifest.json: dim must be a positive integer, got '2'"),
    ("source", manifest(source={"means": [[0.0, 0.0]]}), "manifest.json: source: missing covs"),
    (
        "source dim",
        manifest(source={"means": [[0.0]], "covs": [[[1.0]]], "weights": [1.0]}),
        "manifest.json: source has dimension 1, dim is 2",
    ),
    ("no weights", drop("model.pt"), "no model.pt"),
    ("sha256 mismatch", tamper, "sha256 mismatch: model.pt is "),
    ("not torchscript", not_torchscript, "model.pt does not load as TorchScript: "),
    (
        "wrong shape",
        swap_module(FirstColumn()),
        "forward(t, x) returned (5, 1) for x of shape (5, 2)",
    ),
    ("float64", swap_module(Doubles()), "forward(t, x) returned torch.float64, expected"),
    ("probe fails", swap_module(Raises()), "forward(t, x) failed on a probe input of 5 rows: "),
    ("shape", manifest(shape=[3]), "manifest.json: shape: [3] holds 3 values, dim is 2"),
    ("inputs", manifest(inputs=["x", "t", "c"]), 'manifest.json: inputs: lists "c" but the'),
    (
        "guidance without a null",
        manifest(guidance_scale=2.0),
        "manifest.json: guidance_scale: 2.0 needs a condition with a null",
    ),
    ("guidance", manifest(guidance_scale=-1), "manifest.json: guidance_scale: expected a number"),
    ("data range", manifest(data_range=[1, 0]), "manifest.json: data_range: expected [lo, hi]"),
    (
        "arguments",
        swap_module(ThreeArguments()),
        "forward(t, x, c) takes 3 arguments; the manifest's inputs list 2 (t, x)",
    ),
]


@pytest.mark.parametrize(
    ("change", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_each_refusal_says_why(tmp_path: Path, change: Callable, reason: str) -> None:
    folder = write_model_dir(tmp_path, "tiny")
    change(folder)
    with pytest.raises(ModelRefused) as info:
        load_model(folder, CPU)
    assert str(info.value).startswith(reason)
    assert "\n" not in str(info.value)


def test_sha256_mismatch_names_both_digests(tmp_path: Path) -> None:
    folder = write_model_dir(tmp_path, "tiny")
    expected = json.loads((folder / "manifest.json").read_text())["sha256"]
    tamper(folder)
    actual = hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    with pytest.raises(ModelRefused) as info:
        load_model(folder, CPU)
    assert str(info.value) == f"sha256 mismatch: model.pt is {actual}, manifest says {expected}"


def test_a_tampered_model_is_refused_and_logged_while_its_neighbour_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_model_dir(tmp_path, "good", a=0.25)
    tamper(write_model_dir(tmp_path, "tampered"))
    write_model_dir(tmp_path, "wrong-shape")
    swap_module(FirstColumn())(tmp_path / "wrong-shape")
    (tmp_path / ".partial").mkdir()  # an atomic writer's work in progress is not a model
    with caplog.at_level(logging.INFO, logger="flowserve.loader"):
        models = load_models(tmp_path, CPU)
    assert list(models) == ["good"]
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refusals) == 2
    assert refusals[0].startswith("refused model tampered: sha256 mismatch: model.pt is ")
    assert refusals[1] == (
        "refused model wrong-shape: forward(t, x) returned (5, 1) for x of shape (5, 2)"
    )
    x = torch.randn(3, 2)
    torch.testing.assert_close(models["good"].field(torch.zeros(3, 1), x), 0.25 * x)


def test_a_module_of_another_architecture_loads(tmp_path: Path) -> None:
    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(4, 3)

        def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return x + torch.tanh(self.inner(torch.cat([x, t], dim=1)))

    source = {"means": [[0.0] * 3], "covs": [torch.eye(3).tolist()], "weights": [1.0]}
    torch.manual_seed(0)
    module = Residual().eval()
    model = load_model(write_module_dir(tmp_path, "res", module, source, 3), CPU)
    t, x = torch.rand(6, 1), torch.randn(6, 3)
    with torch.no_grad():
        torch.testing.assert_close(model.field(t, x), module(t, x))


def test_a_missing_models_dir_serves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="flowserve.loader"):
        assert load_models(tmp_path / "absent", CPU) == {}
    assert caplog.records[0].getMessage() == (
        f"models dir {tmp_path / 'absent'} does not exist: no model will be served"
    )
