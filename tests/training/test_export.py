import hashlib
import json

import pytest
import torch

from training.export import check_name, write_artifact
from training.network import VelocityMLP


@pytest.mark.parametrize("name", ["four-gaussians", "a", "m1.v2_x-y", "0" * 64])
def test_good_names(tmp_path, name):
    assert check_name(tmp_path / name) == name


@pytest.mark.parametrize("name", ["Four", "-x", ".hidden", "a b", "0" * 65, "é"])
def test_bad_names(name):
    with pytest.raises(ValueError, match=r"^--out: artifact name .* must match \[a-z0-9\]"):
        check_name(f"models/{name}")


def test_writes_a_loadable_artifact(tmp_path):
    net = VelocityMLP(3, 16, 2)
    out = tmp_path / "models" / "tiny"
    manifest = write_artifact(
        out, net, {"dim": 3, "name": "ignored"}, {"note.txt": lambda p: p.write_text("hi")}
    )
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pt", "note.txt"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert on_disk["format"] == 1 and on_disk["name"] == "tiny" and on_disk["dim"] == 3
    assert on_disk["sha256"] == hashlib.sha256((out / "model.pt").read_bytes()).hexdigest()
    loaded = torch.jit.load(str(out / "model.pt"))
    t, x = torch.rand(5, 1), torch.randn(5, 3)
    torch.testing.assert_close(loaded(t, x), net(t, x), rtol=0, atol=0)
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == ["tiny"]


def test_replaces_an_existing_artifact(tmp_path):
    out = tmp_path / "m"
    write_artifact(out, VelocityMLP(2, 4, 1), {"dim": 2, "version": 1})
    write_artifact(out, VelocityMLP(2, 4, 1), {"dim": 2, "version": 2})
    assert json.loads((out / "manifest.json").read_text())["version"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_mid_write_leaves_nothing(tmp_path, error):
    def failing(path):
        path.write_text("partial")
        raise error

    out = tmp_path / "m"
    with pytest.raises(type(error)):
        write_artifact(out, VelocityMLP(2, 4, 1), {"dim": 2}, {"report.png": failing})
    assert list(tmp_path.iterdir()) == []


def test_a_failure_keeps_the_previous_artifact(tmp_path):
    out = tmp_path / "m"
    write_artifact(out, VelocityMLP(2, 4, 1), {"dim": 2, "version": 1})

    def failing(path):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_artifact(out, VelocityMLP(2, 4, 1), {"dim": 2, "version": 2}, {"x": failing})
    assert json.loads((out / "manifest.json").read_text())["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
