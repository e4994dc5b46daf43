"""Writing a model artifact: the only place that calls `torch.jit.script` and `torch.jit.save`.

`write_artifact` builds the whole folder (model.pt, manifest.json and any extra files) in a
hidden temporary sibling of DIR, then renames it into place; an existing DIR is renamed aside
first and deleted last. A crash or Ctrl-C at any point leaves either the old artifact or the new
one under DIR, never a half-written folder, and the temporary folder is removed.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

# The artifact's format is the loader's: what it checks is what this writes.
from service.loader import MANIFEST_FORMAT, NAME_PATTERN, sha256_of


def check_name(out: str | Path) -> str:
    """The artifact name (DIR's basename); ValueError unless it matches `NAME_PATTERN`."""
    name = Path(out).name
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"--out: artifact name {name!r} must match {NAME_PATTERN.pattern} "
            "(it is the last part of DIR)"
        )
    return name


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
    out = Path(out)
    name = check_name(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{name}.tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        module = copy.deepcopy(network).cpu().float().eval()
        torch.jit.save(torch.jit.script(module), str(staging / "model.pt"))
        written = {
            "format": MANIFEST_FORMAT,
            "name": name,
            **{k: v for k, v in manifest.items() if k not in ("format", "name", "sha256")},
            "sha256": sha256_of(staging / "model.pt"),
        }
        (staging / "manifest.json").write_text(json.dumps(written, indent=2) + "\n", "utf-8")
        for file_name, writer in (extra_files or {}).items():
            writer(staging / file_name)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def _swap_in(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`, replacing an existing `out` with two renames."""
    if not out.exists():
        os.replace(staging, out)
        return
    retired = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    os.replace(out, retired)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(retired, out)
        raise
    if retired.is_dir():
        shutil.rmtree(retired, ignore_errors=True)
    else:
        retired.unlink()
