"""Writing a model artifact: the only place that calls `torch.jit.script` and `torch.jit.save`.

The folder is written atomically by `service.artifact.write_artifact_dir` (the loader's own
format, name rules and digest), so a crash or Ctrl-C never leaves a half-written model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from service.artifact import check_name, write_artifact_dir

__all__ = ["check_name", "write_artifact"]


def write_artifact(
    out: str | Path,
    network: torch.nn.Module,
    manifest: Mapping[str, Any],
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
) -> dict[str, Any]:
    """Write `out`/model.pt (the scripted network, CPU float32), `out`/manifest.json and extras.

    manifest: any JSON-ready fields; "format", "name" and "sha256" are filled in here.
    extra_files: file name -> writer called with the path to write. Returns the manifest written.
    """
    module = copy.deepcopy(network).cpu().float().eval()

    def save(path: Path) -> None:
        torch.jit.save(torch.jit.script(module), str(path))

    return write_artifact_dir(out, save, manifest, extra_files)
