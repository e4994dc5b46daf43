"""The model artifact on disk, `models/<name>/`: its manifest's format, its name, its digest, and
the atomic write that every producer of artifacts uses (the trainer, `flowserve package`).

`write_artifact_dir` builds the whole folder (model.pt, manifest.json and any extra files) in a
hidden temporary sibling of DIR, then renames it into place; an existing DIR is renamed aside
first and deleted last. A crash or Ctrl-C at any point leaves either the old artifact or the new
one under DIR, never a half-written folder, and the temporary folder is removed. The loader skips
hidden folders, so a folder being built is never served.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MANIFEST_FORMAT = 1
REQUIRED_FIELDS = ("format", "name", "dim", "source", "sha256")


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_name(out: str | Path, flag: str = "--out") -> str:
    """The artifact name (DIR's basename); ValueError unless it matches `NAME_PATTERN`."""
    name = Path(out).name
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{flag}: artifact name {name!r} must match {NAME_PATTERN.pattern} "
            "(it is the last part of DIR)"
        )
    return name


def check_destination(out: str | Path, force: bool, flag: str = "--out") -> None:
    """ValueError when `out` exists and `force` is not given: an artifact is never replaced
    without being asked."""
    out = Path(out)
    if out.exists() and not force:
        what = "a model folder" if (out / "manifest.json").exists() else "something"
        raise ValueError(f"{flag}: {out} already holds {what}; pass --force to replace it")


def write_artifact_dir(
    out: str | Path,
    write_model: Callable[[Path], None],
    manifest: Mapping[str, Any],
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
) -> dict[str, Any]:
    """Write `out` atomically: model.pt by `write_model(path)`, manifest.json, and extras.

    manifest: any JSON-ready fields; "format", "name" and "sha256" are filled in here.
    extra_files: file name -> writer called with the path to write. Returns the manifest written.
    """
    out = Path(out)
    name = check_name(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{name}.tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        write_model(staging / "model.pt")
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
