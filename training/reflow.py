"""Reflow (rectified flow) and few-step distillation: a new field trained on the straight paths
between start points and where a trained teacher's ODE takes them.

Pairs (x0, x1 = T(x0)), T the teacher's ODE solution by its own solver (the service's
`integrate` over the teacher's `VelocityField`), are drawn once before training; the student is
trained by flow matching on straight paths between them. Its field is straighter than the
teacher's (the pairs do not cross), so few Euler steps land where many did. With
`teacher.distill` > 0, two more terms ask the student's own 1- and 2-step Euler maps to land on
x1, which sharpens the field where one step must jump a seam between modes.
"""

from __future__ import annotations

import torch

from service.loader import LoadedModel, ModelRefused, load_model
from service.solvers import integrate
from training.config import Config

PAIR_CHUNK = 8192
"""Rows of one teacher integration while pairs are drawn (bounds the memory it holds)."""


def load_teacher(config: Config) -> LoadedModel:
    """The teacher of a reflow config, checked: ValueError (one line) when its folder is missing
    or refused (a tampered sha256 among the reasons), or it is conditional, or its dimension or
    source differs from the config's."""
    teacher = config.teacher
    folder = teacher.location
    if not (folder / "manifest.json").is_file():
        raise ValueError(f"teacher.path: {teacher.path}: no model folder there ({folder})")
    try:
        model = load_model(folder, torch.device("cpu"), rewrites=())
    except ModelRefused as exc:
        raise ValueError(f"teacher.path: {teacher.path}: refused: {exc}") from None
    if model.dim != config.dim:
        raise ValueError(
            f"teacher.path: {teacher.path}: the teacher has dimension {model.dim}, the config "
            f"{config.dim}"
        )
    if model.signature.condition is not None:
        raise ValueError(f"teacher.path: {teacher.path}: a conditional teacher cannot be reflowed")
    mine, theirs = config.source, model.source
    same = mine.means.shape == theirs.means.shape and all(
        torch.allclose(getattr(mine, key), getattr(theirs, key), atol=1e-9)
        for key in ("means", "covs", "weights")
    )
    if not same:
        raise ValueError(
            f"source: differs from the teacher's source ({teacher.path}/manifest.json): the "
            "pairs start where the teacher's flow starts"
        )
    return model


@torch.no_grad()
def teacher_pairs(
    teacher: LoadedModel, config: Config, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, x1), each (pairs, dim): x0 from the source, x1 the teacher's ODE solution from it."""
    settings = config.teacher
    x0 = config.source.sample(settings.pairs, generator)
    x1 = torch.cat(
        [
            integrate(teacher.field, x0[i : i + PAIR_CHUNK], settings.steps, settings.solver)
            for i in range(0, settings.pairs, PAIR_CHUNK)
        ]
    )
    return x0, x1


def distillation_loss(velocity, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Mean squared miss of the student's 1-step and 2-step Euler maps from x0 to x1.

    velocity(t, x): the student's field, t (n, 1), x (n, dim)."""
    zeros = torch.zeros(x0.shape[0], 1, dtype=x0.dtype)
    start = velocity(zeros, x0)
    one = x0 + start
    middle = x0 + 0.5 * start
    two = middle + 0.5 * velocity(zeros + 0.5, middle)
    return 0.5 * ((one - x1).square().sum(dim=1).mean() + (two - x1).square().sum(dim=1).mean())
