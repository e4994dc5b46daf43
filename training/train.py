"""Train a flow-matching velocity field and export it as a servable artifact.

    python -m training.train --config FILE --out DIR [--steps N] [--seed S] [--device auto|cpu|cuda]

Conditional flow matching on straight paths: t ~ U[0, 1] (or the end-weighted law of
`TrainConfig.time_sampling`), x_t = (1 - t) x0 + t x1, loss = mean ||v(t, x_t) - (x1 - x0)||^2,
minimised with AdamW. Bad input exits 2 with one line on stderr and writes nothing; a loss that
turns NaN exits 1 and writes nothing; Ctrl-C exits 130 and writes nothing.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from service.artifact import check_destination
from service.cli import OneLineParser, UsageError
from service.devices import DEVICES, resolve_device
from service.field import Condition, Signature, VelocityField
from service.solvers import integrate
from training.config import Config, TrainConfig, load_config
from training.coupling import pair
from training.export import check_name, write_artifact
from training.metrics import score as score_w2
from training.metrics import score_labelled
from training.network import ConditionalMLP, VelocityMLP, num_parameters
from training.progress import Progress
from training.reflow import distillation_loss, load_teacher, teacher_pairs
from training.report import plot_labelled_report, plot_report


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite."""


@dataclass
class TrainResult:
    network: VelocityMLP
    """The network to export (the EMA weights when `train.ema` > 0), eval mode, CPU."""
    losses: list[float] = field(default_factory=list)
    """The minibatch loss at every step."""
    seconds: float = 0.0
    coupling_seconds: float = 0.0
    """Time spent pairing minibatches (the OT assignment), included in `seconds`."""


def sample_times(n: int, train: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """(n, 1) training times in [0, 1] following `train.time_sampling`."""
    u = torch.rand(n, 1, generator=generator)
    if train.time_sampling == "uniform":
        return u
    # The arcsine law sin^2(pi u / 2) puts more draws near t = 0 and t = 1, where the OT field's
    # seams between modes are sharpest and the network's errors cost the most.
    arcsine = torch.sin(0.5 * math.pi * u).square()
    chosen = torch.rand(n, 1, generator=generator) < train.ends_weight
    return torch.where(chosen, arcsine, u)


def lr_factor(step: int, train: TrainConfig) -> float:
    """Multiplier of `train.lr` at 0-based `step`: linear warm-up, then constant or cosine."""
    if step < train.warmup:
        return (step + 1) / train.warmup
    if train.schedule == "constant":
        return 1.0
    progress = (step - train.warmup) / max(1, train.steps - train.warmup)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def signature_of(config: Config) -> Signature:
    """How the service will call the exported network (the manifest's serving fields)."""
    target = config.target
    if config.condition is None:
        return Signature(config.dim, (config.dim,))
    condition = Condition(
        "class",
        1,
        target.classes,
        None if config.condition.p_uncond == 0 else (float(len(target.classes)),),
    )
    return Signature(config.dim, target.shape, ("t", "x", "c"), (-1, 1), condition)


def build_network(config: Config) -> torch.nn.Module:
    """The network the config describes, initialised from the training seed."""
    model = config.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        if config.condition is None:
            return VelocityMLP(config.dim, model.hidden, model.layers, model.activation)
        return ConditionalMLP(
            config.target.shape,
            len(config.target.classes),
            model.hidden,
            model.layers,
            model.activation,
            model.embedding,
            model.frequencies,
        )


def train(config: Config, device: torch.device | str = "cpu", progress: bool | str | None = None):
    """Run the optimisation; returns a `TrainResult`. Raises `TrainingDiverged` on a NaN loss.

    Every random draw comes from generators seeded by `config.train.seed`; batches are drawn on
    the CPU, so CPU runs with the same config repeat bit for bit. A conditional model's labels
    are replaced by the null class with probability `condition.p_uncond` (label dropout).
    progress: a `Progress` mode ("bar", "lines", "off"), False for "off", True for "bar", or
    None: a bar on a terminal, lines otherwise.
    """
    settings = config.train
    device = torch.device(device)
    pairs = None
    if settings.coupling == "reflow":
        teacher = load_teacher(config)
        print(
            f"reflow: {config.teacher.pairs} pairs from the teacher "
            f"({config.teacher.steps} {config.teacher.solver} steps)",
            flush=True,
        )
        pairs = teacher_pairs(teacher, config, torch.Generator().manual_seed(settings.seed + 2))
    network = build_network(config).to(device)
    field = VelocityField(signature_of(config), network, device=device)
    condition = config.condition
    null = len(config.target.classes) if condition is not None else 0
    average = copy.deepcopy(network).requires_grad_(False) if settings.ema > 0 else None
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: lr_factor(s, settings))
    generator = torch.Generator().manual_seed(settings.seed)

    result = TrainResult(network=network)
    running = None
    started = time.perf_counter()
    mode = {True: "bar", False: "off"}.get(progress, progress)
    report = Progress(settings.steps, mode)
    try:
        for step in range(settings.steps):
            labels = None
            if pairs is not None:
                chosen = torch.randint(
                    0, len(pairs[0]), (settings.batch_size,), generator=generator
                )
                x0, x1 = pairs[0][chosen], pairs[1][chosen]
            elif condition is None:
                x0 = config.source.sample(settings.batch_size, generator)
                x1 = config.target.sample(settings.batch_size, generator)
            else:
                x0 = config.source.sample(settings.batch_size, generator)
                x1, labels = config.target.sample_labelled(settings.batch_size, generator)
                dropped = torch.rand(settings.batch_size, generator=generator) < condition.p_uncond
                labels = torch.where(dropped, null, labels).to(device)
            paired_at = time.perf_counter()
            x0, x1 = pair(x0, x1, settings.coupling)
            result.coupling_seconds += time.perf_counter() - paired_at
            t = sample_times(settings.batch_size, settings, generator)
            x0, x1, t = x0.to(device), x1.to(device), t.to(device)

            xt = (1 - t) * x0 + t * x1
            velocity = field.differentiable(t, xt, labels)
            loss = (velocity - (x1 - x0)).square().sum(dim=1).mean()
            if pairs is not None and config.teacher.distill > 0:
                loss = loss + config.teacher.distill * distillation_loss(
                    field.differentiable, x0, x1
                )
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"train: the loss became {value} at step {step + 1}; "
                    f"lower train.lr (now {settings.lr}); nothing was written"
                )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            if average is not None:
                # A short memory early on, so the average is not dominated by the random init.
                decay = min(settings.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for kept, live in zip(average.parameters(), network.parameters(), strict=True):
                        kept.lerp_(live, 1 - decay)

            result.losses.append(value)
            running = value if running is None else 0.98 * running + 0.02 * value
            report.update(step + 1, running, schedule.get_last_lr()[0])
    finally:
        report.close()
    result.seconds = time.perf_counter() - started
    result.network = (average if average is not None else network).cpu().eval()
    return result


def write_losses(path: Path, losses: list[float]) -> None:
    lines = ["step,loss"] + [f"{i},{value:.6g}" for i, value in enumerate(losses, start=1)]
    path.write_text("\n".join(lines) + "\n", "utf-8")


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def print_quality(quality: dict, out=None) -> None:
    out = out or sys.stdout
    print(
        f"W2 {quality['w2']:.4f}  floor {quality['w2_floor']:.4f}  "
        f"W2/floor {quality['w2_ratio']:.3f}  NPE {quality['npe']:.4f}",
        file=out,
    )
    table = "  ".join(f"{k}:{row['w2_ratio']:.3f}" for k, row in quality["by_steps"].items())
    print(f"W2/floor by Euler steps  {table}", file=out)
    for mode in quality.get("modes", []):
        mean = ", ".join(f"{c:g}" for c in mode["mean"])
        print(
            f"mode ({mean})  share {mode['share']:.4f} (weight {mode['weight']:.4f})  "
            f"mean error {_figure(mode['mean_error'])}  cov error {_figure(mode['cov_error'])}",
            file=out,
        )


SCORES = {
    # unconditional: points, chunk, floor draws; class-conditional: draws, Euler steps
    "full": {"num_samples": 10_000, "chunk": 2000, "floor_draws": 20, "draws": 3, "steps": 100},
    "quick": {"num_samples": 2000, "chunk": 1000, "floor_draws": 5, "draws": 1, "steps": 25},
}
"""How thoroughly the trainer scores its model (`--score`); "none" skips it."""


def run(
    config: Config,
    out: Path,
    device: torch.device | str = "cpu",
    *,
    progress: bool | str | None = None,
    score: str = "full",
    num_samples: int | None = None,
    chunk: int | None = None,
    score_draws: int | None = None,
    score_steps: int | None = None,
) -> dict:
    """Train, score, and write the artifact at `out`: model.pt, manifest.json, loss.csv
    (step,loss) and report.png. Returns the manifest.

    score: "full", "quick" (a few seconds, a rougher figure) or "none" (manifest "quality" is
    null). Unconditional models are scored by `metrics.score` (`num_samples`, `chunk` override
    the preset); class-conditional ones by `metrics.score_labelled` (`score_draws` draws of
    `score_steps` Euler steps) at guidance 1, the default scale, 2 and 3.

    Manifest keys beyond the contract's: "config" (the resolved config), "torch_version",
    "parameters", "final_loss" (mean of the last 100 steps), "train_seconds",
    "coupling_ms_per_step", "created_at" (ISO 8601 UTC) and "quality"; for a conditional model
    also the serving fields "shape", "inputs", "condition", "guidance_scale" and "data_range".
    """
    if score not in (*SCORES, "none"):
        raise ValueError(f"--score: expected full, quick or none, got {score!r}")
    preset = SCORES.get(score, SCORES["quick"])
    result = train(config, device, progress=progress)
    network = result.network
    # The score draws from its own generator, so it never depends on how training consumed its.
    generator = torch.Generator().manual_seed(config.train.seed + 1)
    steps = len(result.losses)
    manifest = {
        "dim": config.dim,
        "source": config.source.to_spec(),
        "config": config.to_dict(),
        "torch_version": torch.__version__,
        "parameters": num_parameters(network),
        "final_loss": sum(result.losses[-100:]) / len(result.losses[-100:]),
        "train_seconds": round(result.seconds, 1),
        "coupling_ms_per_step": round(1000 * result.coupling_seconds / steps, 2),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quality": None,
    }
    if config.condition is not None:
        signature = signature_of(config)
        field = VelocityField(signature, network)
        default = config.guidance_scale if config.guidance_scale is not None else 1.0
        scales = tuple(sorted({1.0, default, 2.0, 3.0}))
        if signature.condition.null is None:
            scales = (1.0,)
        quality = None
        if score != "none":
            quality = score_labelled(
                field,
                config.source,
                config.target,
                generator,
                scales=scales,
                num_steps=score_steps or preset["steps"],
                draws=score_draws or preset["draws"],
                on_stage=_say,
            )
            print_labelled_quality(quality)
        manifest.update(signature.manifest_fields())
        if config.guidance_scale is not None:
            manifest["guidance_scale"] = config.guidance_scale
        manifest["data_range"] = list(config.target.data_range)
        manifest["quality"] = quality
        _say("report: class grids for report.png")
        grids = {
            w: class_grid(field, config, generator, w, score_steps or preset["steps"])
            for w in scales
        }
        title = f"{out.name}: not scored"
        if quality is not None:
            row = quality["by_guidance"][f"{default:g}"]
            title = (
                f"{out.name}: accuracy {row['accuracy']:.3f} and Frechet / floor "
                f"{row['fd_ratio']:.2f} at guidance {default:g}"
            )

        def report(path: Path) -> None:
            plot_labelled_report(
                path, result.losses, grids, config.target.data_range, quality, title
            )
    else:
        quality = None
        if score != "none":
            quality = score_w2(
                network,
                config.source,
                config.target,
                generator,
                num_samples=num_samples or preset["num_samples"],
                chunk=chunk or preset["chunk"],
                floor_draws=preset["floor_draws"],
                on_stage=_say,
            )
            print_quality(quality)
        manifest["quality"] = quality
        _say("report: samples and paths for report.png")
        with torch.no_grad():
            x0 = config.source.sample(3000, generator)
            samples = integrate(network, x0, 100)
            paths = integrate(network, x0[:40], 100, stride=1)
        target_samples = config.target.sample(3000, generator)
        title = f"{out.name}: not scored"
        if quality is not None:
            title = (
                f"{out.name}: W2/floor {quality['w2_ratio']:.3f} at 100 Euler steps, "
                f"NPE {_figure(quality['npe'])}"
            )
        by_steps = quality["by_steps"] if quality is not None else {}

        def report(path: Path) -> None:
            plot_report(path, result.losses, samples, target_samples, paths, by_steps, title)

    return write_artifact(
        out,
        network,
        manifest,
        extra_files={
            "loss.csv": lambda path: write_losses(path, result.losses),
            "report.png": report,
        },
    )


def _say(text: str) -> None:
    print(text, flush=True)


@torch.no_grad()
def class_grid(
    field: VelocityField,
    config: Config,
    generator: torch.Generator,
    scale: float,
    num_steps: int,
    per_class: int = 8,
) -> torch.Tensor:
    """(classes, per_class, *shape) samples asked for each class at guidance `scale`."""
    count = len(config.target.classes)
    labels = torch.arange(count).repeat_interleave(per_class).to(torch.float32).unsqueeze(1)
    x0 = config.source.sample(len(labels), generator)
    w = None if scale == 1 else torch.full((len(labels), 1), float(scale))
    samples = integrate(lambda t, x: field(t, x, labels, w), x0, num_steps)
    return samples.reshape(count, per_class, *config.target.shape)


def print_labelled_quality(quality: dict, out=None) -> None:
    out = out or sys.stdout
    print(
        f"classifier accuracy on held-out data {quality['classifier_held_out_accuracy']:.4f}; "
        f"Frechet floor {quality['fd_floor']:.4f}",
        file=out,
    )
    for w, row in quality["by_guidance"].items():
        print(
            f"guidance {w}: accuracy {row['accuracy']:.4f} (sd {row['accuracy_sd']:.4f})  "
            f"Frechet/floor {row['fd_ratio']:.3f} (sd {row['fd_ratio_sd']:.3f})  "
            f"nearest-neighbour ratio {row['nn_ratio']:.3f}",
            file=out,
        )


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="training config (JSON)")
    parser.add_argument("--out", required=True, type=Path, help="artifact folder to write")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--seed", type=int, help="override train.seed")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument(
        "--score",
        choices=("full", "quick", "none"),
        default="full",
        help="how thoroughly to score the model after training (default full)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing model folder at --out"
    )
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    try:
        check_name(args.out)
        check_destination(args.out, args.force)
        config = load_config(args.config, overrides={"steps": args.steps, "seed": args.seed})
        device = resolve_device(args.device, "--device")
        run(config, args.out, device, score=args.score)
    except (ValueError, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
