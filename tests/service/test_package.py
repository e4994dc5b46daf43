"""flowserve package: any TorchScript field becomes a folder the service loads, or one line says
why not and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.loader import load_model
from service.package import main

CPU = torch.device("cpu")


class Linear(torch.nn.Module):
    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -x + t


class ThreeArguments(torch.nn.Module):
    def forward(self, t: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x * c.unsqueeze(1).to(x.dtype)


class Flattens(torch.nn.Module):
    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class Logarithm(torch.nn.Module):
    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)  # NaN for negative x


def scripted(tmp_path: Path, module: torch.nn.Module, name: str = "field.pt") -> str:
    path = tmp_path / name
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


def test_a_packaged_field_loads_as_described(tmp_path: Path, capsys) -> None:
    out = tmp_path / "models" / "three-classes"
    code = main(
        [
            scripted(tmp_path, ThreeArguments()),
            "--out",
            str(out),
            "--shape",
            "2",
            "--classes",
            "a,b,c",
            "--null",
            "0",
            "--guidance-scale",
            "2",
            "--source",
            "normal:0.5",
        ]
    )
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"] == ["t", "x", "c"]
    assert manifest["condition"] == {"kind": "class", "classes": ["a", "b", "c"], "null": 0}
    assert manifest["guidance_scale"] == 2.0
    assert manifest["source"]["covs"] == [[[0.25, 0.0], [0.0, 0.25]]]
    model = load_model(out, CPU, rewrites=())
    assert model.signature.condition.classes == ("a", "b", "c")
    assert capsys.readouterr().out.startswith(f"wrote {out}: shape [2], inputs ['t', 'x', 'c']")


def test_a_mixture_source_from_a_file(tmp_path: Path) -> None:
    source = {"means": [[1.0, 0.0]], "covs": [[[2.0, 0.0], [0.0, 1.0]]], "weights": [1.0]}
    (tmp_path / "source.json").write_text(json.dumps(source))
    out = tmp_path / "m"
    field = scripted(tmp_path, Linear())
    assert (
        main([field, "--out", str(out), "--shape", "2", "--source", str(tmp_path / "source.json")])
        == 0
    )
    assert json.loads((out / "manifest.json").read_text())["source"] == source


ERRORS = [
    (Linear(), ["--shape", "3,0"], "--shape: expected positive sizes"),
    (Linear(), ["--shape", "2", "--source", "normal:-1"], "--source: normal:STD wants a positive"),
    (Linear(), ["--shape", "2", "--source", "nope.json"], "--source: nope.json: no such file"),
    (
        Linear(),
        [
            "--shape",
            "3",
            "--source",
            '{"means": [[0, 0]], "covs": [[[1, 0], [0, 1]]], "weights": [1]}',
        ],
        "--source: the mixture has dimension 2; the shape holds 3",
    ),
    (Linear(), ["--shape", "2", "--inputs", "t,y"], "inputs: expected"),
    (Linear(), ["--shape", "2", "--time-shape", "1"], "time_shape: expected [-1, 1] or [-1]"),
    (Linear(), ["--shape", "2", "--null", "1"], "--null: only with --classes"),
    (
        Linear(),
        ["--shape", "2", "--classes", "a", "--condition-dim", "3"],
        "--classes: a model takes classes or a vector condition, not both",
    ),
    (
        Linear(),
        ["--shape", "2", "--guidance-scale", "2"],
        "guidance_scale: 2.0 needs a condition with a null",
    ),
    (Linear(), ["--shape", "2", "--data-range", "1", "-1"], "data_range: expected [lo, hi]"),
    (
        ThreeArguments(),
        ["--shape", "2"],
        "forward(t, x, c) takes 3 arguments; the manifest's inputs list 2 (t, x)",
    ),
    (Flattens(), ["--shape", "2,3"], "forward(t, x) returned (5, 6) for x of shape (5, 2, 3)"),
    (Logarithm(), ["--shape", "2"], "forward(t, x) returned NaN or infinity on a probe input"),
]


@pytest.mark.parametrize(("module", "flags", "message"), ERRORS)
def test_each_problem_is_one_line_and_nothing_is_written(
    tmp_path: Path, capsys, module: torch.nn.Module, flags: list[str], message: str
) -> None:
    out = tmp_path / "models" / "m"
    assert main([scripted(tmp_path, module), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}"), err
    assert err.count("\n") == 1
    assert not out.exists()
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


def test_usage_errors(tmp_path: Path, capsys) -> None:
    assert main(["missing.pt", "--out", str(tmp_path / "m"), "--shape", "2"]) == 2
    assert capsys.readouterr().err == "error: MODEL missing.pt: no such file\n"
    assert (
        main([scripted(tmp_path, Linear()), "--out", str(tmp_path / "Bad_Name"), "--shape", "2"])
        == 2
    )
    assert capsys.readouterr().err.startswith("error: --out: artifact name 'Bad_Name' must match")
    assert main([scripted(tmp_path, Linear()), "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err == (
        "error: flowserve package: the following arguments are required: --shape\n"
    )


def test_an_existing_folder_is_replaced_only_with_force(tmp_path: Path, capsys) -> None:
    out = tmp_path / "m"
    field = scripted(tmp_path, Linear())
    assert main([field, "--out", str(out), "--shape", "2"]) == 0
    first = json.loads((out / "manifest.json").read_text())
    assert main([field, "--out", str(out), "--shape", "2", "--data-range", "-1", "1"]) == 2
    assert f"--out: {out} already holds a model folder; pass --force" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text()) == first
    assert (
        main([field, "--out", str(out), "--shape", "2", "--data-range", "-1", "1", "--force"]) == 0
    )
    assert json.loads((out / "manifest.json").read_text())["data_range"] == [-1.0, 1.0]
