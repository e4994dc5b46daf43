"""The artifact's report.png: a headless matplotlib page of four panels.

Loss curve; generated samples over target samples; a few generated trajectories; W2 / floor
against the number of Euler steps. Points of more than two dimensions show their first two
coordinates.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display is ever needed, and no GUI backend is imported

import matplotlib.pyplot as plt
import torch


def plot_report(
    path: Path,
    losses: list[float],
    samples: torch.Tensor,
    target_samples: torch.Tensor,
    trajectories: torch.Tensor,
    by_steps: dict[str, dict[str, float]],
    title: str = "",
) -> None:
    """Save the report to `path` (PNG).

    samples, target_samples: (n, d); trajectories: (steps + 1, m, d); by_steps: the quality
    table {"K": {"w2_ratio": ...}}.
    """
    fig, axes = plt.subplots(2, 2, figsize=(10, 9), dpi=72)
    (loss_ax, sample_ax), (path_ax, step_ax) = axes

    loss_ax.plot(range(1, len(losses) + 1), losses, lw=0.5, alpha=0.4, color="tab:blue")
    window = max(1, len(losses) // 100)
    if len(losses) >= window:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1)
        loss_ax.plot(range(window, len(losses) + 1), smooth, lw=1.5, color="tab:blue")
    loss_ax.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")

    target = target_samples[:, :2].numpy()
    generated = samples[:, :2].numpy()
    sample_ax.scatter(target[:, 0], target[:, 1], s=2, alpha=0.3, color="tab:gray", label="target")
    sample_ax.scatter(
        generated[:, 0], generated[:, 1], s=2, alpha=0.4, color="tab:orange", label="generated"
    )
    sample_ax.set(title="samples (100 Euler steps)", aspect="equal")
    sample_ax.legend(loc="upper right", markerscale=4)

    paths = trajectories[:, :, :2].numpy()
    path_ax.plot(paths[:, :, 0], paths[:, :, 1], lw=0.6, alpha=0.6, color="tab:olive")
    path_ax.scatter(paths[0, :, 0], paths[0, :, 1], s=4, color="black", label="x0")
    path_ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=4, color="tab:orange", label="x1")
    path_ax.set(title="generated trajectories", aspect="equal")
    path_ax.legend(loc="upper right", markerscale=3)

    if by_steps:
        plot_steps(step_ax, by_steps)
    else:
        step_ax.text(0.5, 0.5, "not scored (--score none)", ha="center", va="center")
        step_ax.set_axis_off()

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_steps(ax, by_steps: dict[str, dict[str, float]]) -> None:
    """W2 / floor (with its spread) against the number of Euler steps."""
    counts = sorted(by_steps, key=int)
    ratios = [by_steps[k]["w2_ratio"] for k in counts]
    spreads = [by_steps[k].get("w2_ratio_sd", 0.0) for k in counts]
    ax.errorbar([int(k) for k in counts], ratios, yerr=spreads, marker="o", capsize=3)
    ax.axhline(1.0, color="tab:gray", ls="--", lw=1)
    ax.set(xscale="log", xlabel="Euler steps", ylabel="W2 / floor", title="quality per step count")
    for k, ratio in zip(counts, ratios, strict=True):
        ax.annotate(
            f"{ratio:.2f}",
            (int(k), ratio),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )


def image_grid(images: torch.Tensor, data_range: tuple[float, float], gap: int = 1) -> torch.Tensor:
    """Tile images (rows, cols, *shape) with shape (H, W), (1, H, W) or (3, H, W) into one
    (rows (H + gap), cols (W + gap), 3) array in [0, 1], values mapped from `data_range`."""
    rows, cols = images.shape[:2]
    pictures = images.reshape(rows, cols, -1, *images.shape[-2:])
    if pictures.shape[2] == 1:
        pictures = pictures.expand(rows, cols, 3, *pictures.shape[-2:])
    low, high = data_range
    pictures = ((pictures - low) / (high - low)).clamp(0, 1)
    height, width = pictures.shape[-2:]
    canvas = torch.ones(rows * (height + gap), cols * (width + gap), 3)
    for r in range(rows):
        for c in range(cols):
            top, left = r * (height + gap), c * (width + gap)
            canvas[top : top + height, left : left + width] = pictures[r, c].permute(1, 2, 0)
    return canvas


def plot_labelled_report(
    path: Path,
    losses: list[float],
    grids: dict[float, torch.Tensor],
    data_range: tuple[float, float],
    quality: dict | None,
    title: str = "",
) -> None:
    """A class-conditional model's report: the loss curve, then a grid of samples per guidance
    scale (one row per class), each titled with its accuracy and Frechet / floor.

    grids: scale -> (classes, per_class, *shape) samples.
    """
    panels = len(grids) + 1
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 4.2), dpi=80)
    loss_ax = axes[0]
    loss_ax.plot(range(1, len(losses) + 1), losses, lw=0.5, alpha=0.4, color="tab:blue")
    loss_ax.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    for ax, (scale, images) in zip(axes[1:], sorted(grids.items()), strict=True):
        ax.imshow(image_grid(images, data_range).numpy(), interpolation="nearest")
        heading = f"guidance {scale:g}"
        if quality is not None:
            row = quality["by_guidance"][f"{scale:g}"]
            heading += f"\naccuracy {row['accuracy']:.3f}, Frechet/floor {row['fd_ratio']:.2f}"
        ax.set_title(heading, fontsize=9)
        ax.set_yticks(
            [i * (images.shape[-2] + 1) + images.shape[-2] / 2 for i in range(images.shape[0])]
        )
        ax.set_yticklabels(range(images.shape[0]), fontsize=7)
        ax.set_xticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
