"""The velocity network v(t, x): a plain MLP on the concatenation [x, t].

The layout (`torch.cat([x, t], dim=-1)` fed to one `torch.nn.Sequential` of Linear and
activation layers) is the reference post's and is kept on purpose: it scripts cleanly, and the
service's fast path recognises it (its oneDNN fuser takes each linear + activation as one kernel;
the optional `time_fold` rewrite splits the time column off the first layer).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
}


class VelocityMLP(nn.Module):
    """v(t, x) with `layers` hidden layers of width `hidden`.

    forward: t (B, 1), x (B, dim) -> (B, dim), all float32.
    """

    def __init__(self, dim: int, hidden: int = 64, layers: int = 3, activation: str = "elu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation: unknown {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        widths = [dim + 1] + [hidden] * layers
        blocks: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            blocks += [nn.Linear(width_in, width_out), ACTIVATIONS[activation]()]
        blocks.append(nn.Linear(widths[-1], dim))
        self.net = nn.Sequential(*blocks)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t], dim=-1))


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class ConditionalMLP(nn.Module):
    """v(t, x, c) for samples of any shape, with a class condition: an MLP on the concatenation
    of the flattened x, sine and cosine features of t at `frequencies` multiples of pi, and a
    learned embedding of c. Class index `num_classes` is the null ("no condition") that label
    dropout trains, so one network gives both fields of classifier-free guidance.

    forward: t (B, 1), x (B, *shape), c (B,) int64 in [0, num_classes] -> (B, *shape) float32.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        num_classes: int,
        hidden: int = 512,
        layers: int = 3,
        activation: str = "silu",
        embedding: int = 64,
        frequencies: int = 16,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation: unknown {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        dim = 1
        for size in shape:
            dim *= size
        self.embed = nn.Embedding(num_classes + 1, embedding)
        # Time features: one scalar column is hard for an MLP to read finely; sines and cosines
        # at several frequencies let the field change quickly in t where it must.
        self.register_buffer("frequencies", torch.arange(1, frequencies + 1) * torch.pi)
        widths = [dim + 2 * frequencies + embedding] + [hidden] * layers
        blocks: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            blocks += [nn.Linear(width_in, width_out), ACTIVATIONS[activation]()]
        blocks.append(nn.Linear(widths[-1], dim))
        self.net = nn.Sequential(*blocks)

    def forward(self, t: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        angles = t * self.frequencies
        features = [x.flatten(1), torch.sin(angles), torch.cos(angles), self.embed(c)]
        return self.net(torch.cat(features, dim=-1)).reshape(x.shape)
