"""Graph rewrites that make any loaded velocity model faster without changing its numbers.

Each rewrite works on the TorchScript graph, not on our exporter's classes, so models built
elsewhere benefit too. The result is checked against the graph as loaded on a probe input; a
rewrite that fails or changes the output beyond float32 noise is dropped and logged.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("flowserve.fastpath")

ATOL = 1e-5
RTOL = 1e-4


def optimize(
    module: torch.jit.ScriptModule, dim: int, device: torch.device
) -> tuple[torch.jit.ScriptModule, list[str]]:
    """Return (the fastest verified equivalent of `module`, names of the rewrites applied)."""
    try:
        frozen = torch.jit.freeze(module.eval())
    except Exception as exc:  # a module freeze cannot handle is still served as it is
        log.warning("graph freezing skipped: %s", str(exc).splitlines()[0])
        return module, []
    if not _agrees(module, frozen, dim, device):
        log.warning("graph freezing skipped: output differs from the loaded graph")
        return module, []
    return frozen, ["freeze"]


def _agrees(
    reference: torch.jit.ScriptModule,
    candidate: torch.jit.ScriptModule,
    dim: int,
    device: torch.device,
    rows: int = 257,
) -> bool:
    generator = torch.Generator().manual_seed(1)
    t = torch.rand(rows, 1, generator=generator).to(device)
    x = (3 * torch.randn(rows, dim, generator=generator)).to(device)
    with torch.inference_mode():
        expected = reference(t, x)
        try:
            got = candidate(t, x)
        except Exception:
            return False
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=RTOL, atol=ATOL)
