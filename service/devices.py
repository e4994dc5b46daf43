"""Which torch device a setting or a flag means: one rule for the service and the trainer."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(setting: str, field: str = "device") -> torch.device:
    """ "auto": CUDA when available, else the CPU; "cuda" without a CUDA device is a ValueError
    naming `field` (the setting or the flag)."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{field}: cuda was asked for but no CUDA device is available")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)
