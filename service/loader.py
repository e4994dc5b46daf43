"""Loading model folders: manifest checks, sha256, TorchScript load, probe and warm-up.

This is the only place the service calls `torch.jit.load`. A folder that fails any check is
refused with one log line naming it and why; the others are served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.fastpath import DEFAULT_REWRITES, optimize
from service.mixture import GaussianMixture

log = logging.getLogger("flowserve.loader")

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MANIFEST_FORMAT = 1


class ModelRefused(Exception):
    """A model folder that cannot be served; the message says why."""


@dataclass(eq=False)
class LoadedModel:
    """A servable model. `module` is the (possibly optimised) graph for plain passes;
    `unfused_module` the same graph without the oneDNN fuser, for small passes, when `module` is
    fused; `autograd_module` the graph as loaded, for passes that differentiate through it."""

    name: str
    dim: int
    source: GaussianMixture
    manifest: dict[str, Any]
    module: torch.jit.ScriptModule
    autograd_module: torch.jit.ScriptModule
    device: torch.device
    optimizations: list[str] = field(default_factory=list)
    unfused_module: torch.jit.ScriptModule | None = None


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse and check `folder/manifest.json` against the contract; raise ModelRefused."""
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelRefused("no manifest.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelRefused(f"manifest.json unreadable: {exc}") from None
    if not isinstance(manifest, dict):
        raise ModelRefused("manifest.json: not a JSON object")
    missing = [key for key in ("format", "name", "dim", "source", "sha256") if key not in manifest]
    if missing:
        raise ModelRefused(f"manifest.json: missing {', '.join(missing)}")
    if manifest["format"] != MANIFEST_FORMAT:
        raise ModelRefused(f"manifest.json: format {manifest['format']!r} is not {MANIFEST_FORMAT}")
    if manifest["name"] != folder.name:
        raise ModelRefused(f"manifest.json: name {manifest['name']!r} differs from the folder name")
    if not isinstance(manifest["name"], str) or not NAME_PATTERN.fullmatch(manifest["name"]):
        raise ModelRefused(f"manifest.json: name must match {NAME_PATTERN.pattern}")
    dim = manifest["dim"]
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ModelRefused(f"manifest.json: dim must be a positive integer, got {dim!r}")
    if not isinstance(manifest["sha256"], str):
        raise ModelRefused("manifest.json: sha256 must be a hex string")
    return manifest


def load_model(
    folder: Path, device: torch.device, *, rewrites: tuple[str, ...] = DEFAULT_REWRITES
) -> LoadedModel:
    """Load and check one model folder; raise ModelRefused with the reason."""
    manifest = read_manifest(folder)
    dim = manifest["dim"]
    try:
        source = GaussianMixture.from_spec(manifest["source"], field="manifest.json: source")
    except ValueError as exc:
        raise ModelRefused(str(exc)) from None
    if source.dim != dim:
        raise ModelRefused(f"manifest.json: source has dimension {source.dim}, dim is {dim}")
    weights = folder / "model.pt"
    if not weights.is_file():
        raise ModelRefused("no model.pt")
    digest = sha256_of(weights)
    if digest != manifest["sha256"].lower():
        raise ModelRefused(
            f"sha256 mismatch: model.pt is {digest}, manifest says {manifest['sha256']}"
        )
    try:
        module = torch.jit.load(str(weights), map_location=device)
    except Exception as exc:  # torch raises several unrelated types for a corrupt archive
        raise ModelRefused(
            f"model.pt does not load as TorchScript: {exc}".splitlines()[0]
        ) from None
    module.eval()
    probe(module, dim, device)
    fast = optimize(module, dim, device, rewrites)
    return LoadedModel(
        name=manifest["name"],
        dim=dim,
        source=source,
        manifest=manifest,
        module=fast.module,
        autograd_module=module,
        device=device,
        optimizations=fast.applied,
        unfused_module=fast.unfused,
    )


def probe(module: torch.jit.ScriptModule, dim: int, device: torch.device, rows: int = 5) -> None:
    """Check v(t, x) on a small input: shape (rows, dim), float32."""
    t = torch.linspace(0, 1, rows, device=device).unsqueeze(1)
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.inference_mode():
            out = module(t, x)
    except Exception as exc:
        raise ModelRefused(
            f"forward(t, x) failed on a probe input: {exc}".splitlines()[0]
        ) from None
    if not isinstance(out, torch.Tensor) or out.shape != (rows, dim):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelRefused(f"forward(t, x) returned {shape} for x of shape {(rows, dim)}")
    if out.dtype != torch.float32:
        raise ModelRefused(f"forward(t, x) returned {out.dtype}, expected torch.float32")


def warm_up(model: LoadedModel, passes: int, rows: int) -> None:
    """Run a few forward passes so the first request does not pay for lazy initialisation."""
    t = torch.full((rows, 1), 0.5, device=model.device)
    x = torch.zeros(rows, model.dim, device=model.device)
    with torch.no_grad():  # the engine's mode: plans are built for the tensors it passes
        for _ in range(passes):
            model.module(t, x)


def load_models(
    models_dir: Path, device: torch.device, *, rewrites: tuple[str, ...] = DEFAULT_REWRITES
) -> dict[str, LoadedModel]:
    """Every servable folder under `models_dir`, by name; refusals are logged, not raised."""
    models: dict[str, LoadedModel] = {}
    if not models_dir.is_dir():
        log.error("models dir %s does not exist: no model will be served", models_dir)
        return models
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        if folder.name.startswith("."):
            continue  # atomic writers build in hidden sibling folders
        try:
            model = load_model(folder, device, rewrites=rewrites)
        except ModelRefused as exc:
            log.error("refused model %s: %s", folder.name, exc)
            continue
        models[model.name] = model
        log.info(
            "loaded model %s (dim %d) on %s; graph rewrites: %s",
            model.name,
            model.dim,
            device,
            ", ".join(model.optimizations) or "none",
        )
    return models
