"""`flowserve`: start the server, train a model, or call a running server from the shell.

    flowserve serve --models-dir models --port 8000          # = python -m service ...
    flowserve train --config training/configs/four-gaussians.json --out models/mine
    flowserve sample --num-samples 1000 --seed 7 --out x1.npy --plot x1.png
    flowserve trajectory --num-samples 64 --stride 10 --out path.npy --plot path.png
    flowserve encode --x x1.npy --out z.npy
    flowserve log-prob --x x1.npy --out logp.csv
    flowserve log-prob --grid --samples x1.npy --plot density.png

Client commands read `--url` from FLOW_URL and `--api-key` from FLOW_API_KEY when not given.
A bad flag exits 2, an unreachable server or a server error exits 1, each with one line on stderr.

Only `serve` imports the server (and torch); the client commands need httpx and numpy, plus
matplotlib for `--plot`. `train` runs the trainer as a child process: the service package never
imports `training`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from service.client import AnswerInfo, FlowClient, FlowError, PayloadTooLarge
from service.tableau import SOLVER_NAMES

DEFAULT_URL = "http://127.0.0.1:8000"
ARRAY_SUFFIXES = (".npy", ".csv")
PLOT_PATHS = 200
"""At most this many paths are drawn by `trajectory --plot`; more only hide each other."""


class UsageError(Exception):
    """A bad command line: reported in one line, exit code 2. `message` says what is wrong;
    `prog`, when argparse found it, names the command."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(f"{prog}: {message}" if prog else message)
        self.message = message
        self.prog = prog


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing the usage block and exiting; every
    command of the project (flowserve, python -m service, python -m training.train) uses it."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


# --------------------------------------------------------------------------------------------
# Files


def read_points(path: str, flag: str) -> np.ndarray:
    """Points (n, d) float64 from .npy or .csv (one point per row; a header row is allowed)."""
    file = Path(path)
    if file.suffix.lower() not in ARRAY_SUFFIXES:
        raise UsageError(f"{flag} {path}: expected a .npy or .csv file")
    if not file.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        if file.suffix.lower() == ".npy":
            points = np.load(file, allow_pickle=False)
        else:
            try:
                points = np.loadtxt(file, delimiter=",", ndmin=2)
            except ValueError:
                points = np.loadtxt(file, delimiter=",", ndmin=2, skiprows=1)
        points = np.asarray(points, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{flag} {path}: cannot read points: {exc}") from exc
    if points.ndim == 1:
        points = points[:, None]
    if points.ndim != 2 or points.shape[0] == 0:
        raise UsageError(f"{flag} {path}: expected (n, d) points, got shape {points.shape}")
    return points


def write_array(
    path: str,
    array: np.ndarray,
    times: np.ndarray | None = None,
    *,
    column: str | None = None,
) -> None:
    """Writes .npy as is, or .csv: one row per point with columns dim0 .. dim{d-1} (a sample of
    any shape is flattened), or the single column `column` for a vector; with `times`, a
    trajectory (T, n, *shape) in long form with columns time, sample, dim0 ...

    Columns are "dim<i>", not "x<i>": x0 and x1 are the flow's noise and data."""
    file = Path(path)
    if file.suffix.lower() == ".npy":
        np.save(file, array)
        return
    if times is not None:
        steps, n = array.shape[:2]
        flat = array.reshape(steps * n, -1)
        t = np.repeat(times, n)
        index = np.tile(np.arange(n), steps)
        table = np.column_stack([t, index, flat])
        header = ",".join(["time", "sample", *(f"dim{i}" for i in range(flat.shape[1]))])
        np.savetxt(file, table, delimiter=",", header=header, comments="", fmt="%.9g")
        return
    if array.ndim == 1:
        header = column or "value"
        np.savetxt(file, array[:, None], delimiter=",", header=header, comments="", fmt="%.9g")
        return
    flat = array.reshape(array.shape[0], -1)
    header = ",".join(f"dim{i}" for i in range(flat.shape[1]))
    np.savetxt(file, flat, delimiter=",", header=header, comments="", fmt="%.9g")


def _check_output(path: str | None, flag: str, suffixes: Sequence[str]) -> None:
    if path is None:
        return
    if Path(path).suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: expected a file ending in {' or '.join(suffixes)}")
    folder = Path(path).parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


AXES = ("dim 0", "dim 1")
"""Axis labels of point plots: coordinates, not x0 and x1 (the flow's noise and data)."""


def plot_points(
    path: str, points: np.ndarray, title: str, labels: np.ndarray | None = None
) -> None:
    """Scatter of the first two coordinates (a histogram for d = 1), coloured by label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    if points.shape[1] == 1:
        ax.hist(points[:, 0], bins=100)
        ax.set_xlabel(AXES[0])
    else:
        if labels is None:
            ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
        else:
            ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5, c=labels, cmap="tab10")
        ax.set_xlabel(AXES[0])
        ax.set_ylabel(AXES[1])
        ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_paths(path: str, times: np.ndarray, states: np.ndarray, title: str) -> None:
    """Paths of the first two coordinates from start (grey) to end (red); x0 against t for d = 1."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    shown = states[:, :PLOT_PATHS]
    if shown.shape[2] == 1:
        ax.plot(times, shown[:, :, 0], lw=0.5, alpha=0.6)
        ax.set_xlabel("t")
        ax.set_ylabel(AXES[0])
    else:
        ax.plot(shown[:, :, 0], shown[:, :, 1], lw=0.7, alpha=0.6, color="tab:blue")
        ax.scatter(shown[0, :, 0], shown[0, :, 1], s=4, color="grey", label="t = 0")
        ax.scatter(shown[-1, :, 0], shown[-1, :, 1], s=4, color="tab:red", label="t = 1")
        ax.set_xlabel(AXES[0])
        ax.set_ylabel(AXES[1])
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend(loc="upper right")
    ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_density(
    path: str,
    density: np.ndarray,
    extent: tuple[float, float, float, float],
    samples: np.ndarray | None,
    title: str,
) -> None:
    """Heat map of density (ny, nx) over extent (xmin, xmax, ymin, ymax), samples (n, 2) on top."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(density, origin="lower", extent=extent, cmap="viridis", aspect="equal")
    fig.colorbar(image, ax=ax, label="model density")
    if samples is not None:
        ax.scatter(samples[:, 0], samples[:, 1], s=1, color="white", alpha=0.4, label="samples")
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.legend(loc="upper right")
    ax.set_xlabel(AXES[0])
    ax.set_ylabel(AXES[1])
    ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_images(
    path: str,
    images: np.ndarray,
    title: str,
    data_range: Sequence[float] | None,
    columns: int | None = None,
) -> None:
    """A grid of image samples (n, H, W), (n, 1, H, W) or (n, 3, H, W), `columns` a row (one
    row per class when the rows were asked for class by class)."""
    plt = _pyplot()
    count = images.shape[0]
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    pictures = images if images.ndim == 4 else images[:, None]
    low, high = data_range if data_range is not None else (images.min(), images.max())
    pictures = np.clip((pictures - low) / max(high - low, 1e-12), 0, 1).transpose(0, 2, 3, 1)
    if pictures.shape[-1] == 1:
        pictures = np.repeat(pictures, 3, axis=-1)
    fig, axes = plt.subplots(
        rows, columns, figsize=(columns * 0.8, rows * 0.8 + 0.5), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(count):
        axes[i // columns, i % columns].imshow(pictures[i], interpolation="nearest")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _summary(name: str, array: np.ndarray) -> str:
    """`name: shape (n, d)` then per-dimension mean and std of the rows."""
    flat = array.reshape(array.shape[0], -1)
    if flat.shape[1] > 8:  # an image: one figure, not one per pixel
        return (
            f"{name}: shape {tuple(array.shape)}\n"
            f"  mean {flat.mean():.4f}  std {flat.std():.4f}  "
            f"range [{flat.min():.4f}, {flat.max():.4f}]"
        )
    with np.printoptions(precision=4, suppress=True):
        return (
            f"{name}: shape {tuple(array.shape)}\n"
            f"  mean {flat.mean(axis=0)}\n"
            f"  std  {flat.std(axis=0)}"
        )


# --------------------------------------------------------------------------------------------
# Commands


def _client(args: argparse.Namespace) -> FlowClient:
    return FlowClient(args.url, api_key=args.api_key, timeout=args.timeout)


def _seed(args: argparse.Namespace) -> int:
    """The seed to send: the user's, else a fresh one, printed so the run can be repeated."""
    return args.seed if args.seed is not None else secrets.randbelow(2**31)


def _labels(args: argparse.Namespace, rows: int | None) -> tuple[Any, int | None, int | None]:
    """(labels to send, rows, labels per class): `--labels 3` asks every row for class 3;
    `--labels 0,1,2` with `--num-samples 30` asks 10 rows of each, class by class (one each
    without --num-samples). Indices and names both work; "7" is sent as the index 7."""
    if not args.labels:
        return None, rows, None
    parts = [part.strip() for part in args.labels.split(",") if part.strip()]
    values: list[int | str] = [int(part) if part.isdigit() else part for part in parts]
    if len(values) == 1:
        return values[0], rows, None
    rows = rows or len(values)
    if rows % len(values):
        raise UsageError(
            f"--labels: {len(values)} labels do not divide --num-samples {rows}; give a multiple"
        )
    each = rows // len(values)
    return [value for value in values for _ in range(each)], rows, each


def _condition(args: argparse.Namespace) -> list[float] | None:
    if not args.condition:
        return None
    try:
        return [float(part) for part in args.condition.split(",")]
    except ValueError:
        raise UsageError(
            f"--condition: expected comma-separated numbers, got {args.condition!r}"
        ) from None


def _describe(info: AnswerInfo) -> str:
    """`model four-gaussians, seed 7, nfe 100[, guidance 2]`: what reproduces the answer."""
    parts = [f"model {info.model}"]
    if info.seed is not None:
        parts.append(f"seed {info.seed}")
    parts.append(f"{info.num_steps} {info.solver} steps, nfe {info.nfe}")
    if info.guidance_scale is not None:
        parts.append(f"guidance {info.guidance_scale:g}")
    return ", ".join(parts)


def _plot_samples(
    client: FlowClient,
    path: str,
    samples: np.ndarray,
    info: AnswerInfo,
    title: str,
    labels: Any,
    per_class: int | None,
) -> None:
    """Images as a grid (one row per class when asked class by class), points as a scatter."""
    if samples.ndim >= 3 and (samples.ndim == 3 or samples.shape[1] in (1, 3)):
        data_range = client.model(info.model).get("data_range") if info.model else None
        plot_images(path, samples, title, data_range, columns=per_class)
        return
    colours = np.asarray(labels) if isinstance(labels, list) and per_class else None
    plot_points(path, samples.reshape(samples.shape[0], -1), title, colours)


def cmd_sample(args: argparse.Namespace) -> int:
    x0 = read_points(args.x0, "--x0") if args.x0 else None
    seed = _seed(args) if x0 is None else None
    labels, rows, per_class = _labels(args, args.num_samples)
    with _client(args) as client:
        samples, info = client.sample(
            model=args.model,
            num_samples=rows if x0 is None else None,
            num_steps=args.num_steps,
            seed=seed,
            x0=x0,
            solver=args.solver,
            labels=labels,
            condition=_condition(args),
            guidance_scale=args.guidance,
            with_info=True,
        )
        print(_summary("samples", samples))
        print(f"  {_describe(info)}")
        if args.out:
            write_array(args.out, samples)
            print(f"wrote {args.out}")
        if args.plot:
            title = f"samples: {_describe(info)}"
            _plot_samples(client, args.plot, samples, info, title, labels, per_class)
            print(f"wrote {args.plot}")
    return 0


def cmd_trajectory(args: argparse.Namespace) -> int:
    x0 = read_points(args.x0, "--x0") if args.x0 else None
    seed = _seed(args) if x0 is None else None
    labels, rows, _ = _labels(args, args.num_samples)
    with _client(args) as client:
        times, states, info = client.trajectory(
            model=args.model,
            num_samples=rows if x0 is None else None,
            num_steps=args.num_steps,
            seed=seed,
            x0=x0,
            stride=args.stride,
            solver=args.solver,
            labels=labels,
            condition=_condition(args),
            guidance_scale=args.guidance,
            with_info=True,
        )
    print(f"trajectory: shape {tuple(states.shape)}, {len(times)} times from 0 to 1")
    print(_summary("final state", states[-1]))
    print(f"  {_describe(info)}")
    if args.out:
        write_array(args.out, states, times)
        print(f"wrote {args.out}")
    if args.plot:
        flat = states.reshape(*states.shape[:2], -1)
        plot_paths(args.plot, times, flat, f"paths: {_describe(info)}")
        print(f"wrote {args.plot}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    x = read_points(args.x, "--x")
    labels, _, _ = _labels(args, len(x))
    with _client(args) as client:
        latents, info = client.encode(
            x=x,
            model=args.model,
            num_steps=args.num_steps,
            solver=args.solver,
            labels=labels,
            condition=_condition(args),
            guidance_scale=args.guidance,
            with_info=True,
        )
    print(_summary("latents", latents))
    print(f"  {_describe(info)}")
    if args.out:
        write_array(args.out, latents)
        print(f"wrote {args.out}")
    if args.plot:
        plot_points(args.plot, latents.reshape(len(latents), -1), f"latents: {_describe(info)}")
        print(f"wrote {args.plot}")
    return 0


def _log_prob_batched(
    client: FlowClient, points: np.ndarray, batch_rows: int, args: argparse.Namespace
) -> tuple[np.ndarray, dict[str, Any]]:
    """log p(points) (n,) in requests of at most `batch_rows` rows, halving on a 413, and the
    last answer's other fields (model, divergence, seed, num_probes, nfe). Hutchinson requests
    all carry one seed: the user's, else one drawn here."""
    out = np.empty(points.shape[0], dtype=np.float64)
    seed = args.seed
    if seed is None and args.divergence == "hutchinson":
        seed = secrets.randbelow(2**31)
    labels, _, _ = _labels(args, None)
    if isinstance(labels, list):
        raise UsageError("--labels: log-prob takes one label for every point")
    answer: dict[str, Any] = {}
    start = 0
    while start < points.shape[0]:
        stop = min(start + batch_rows, points.shape[0])
        try:
            answer = client.log_prob(
                x=points[start:stop],
                model=args.model,
                num_steps=args.num_steps,
                solver=args.solver,
                divergence=args.divergence,
                num_probes=args.num_probes,
                seed=seed,
                labels=labels,
                condition=_condition(args),
                guidance_scale=args.guidance,
            )
        except PayloadTooLarge:
            if batch_rows == 1:
                raise
            batch_rows = max(1, batch_rows // 2)
            continue
        out[start:stop] = answer["log_prob"]
        start = stop
    return out, answer


def _log_prob_fields(answer: dict[str, Any]) -> str:
    """`model four-gaussians, exact divergence, nfe 100`, with the seed and probes of Hutchinson."""
    parts = [f"model {answer.get('model')}", f"{answer.get('divergence')} divergence"]
    if answer.get("seed") is not None:
        parts.append(f"seed {answer['seed']}, {answer.get('num_probes')} probes")
    parts.append(f"nfe {answer.get('nfe')}")
    return ", ".join(parts)


def cmd_log_prob(args: argparse.Namespace) -> int:
    if args.grid:
        return _log_prob_grid(args)
    if not args.x:
        raise UsageError("log-prob: give --x FILE, or --grid")
    x = read_points(args.x, "--x")
    with _client(args) as client:
        log_prob, answer = _log_prob_batched(client, x, args.batch_rows, args)
    print(f"log_prob: shape {log_prob.shape}")
    print(f"  mean {log_prob.mean():.4f}  min {log_prob.min():.4f}  max {log_prob.max():.4f}")
    print(f"  {_log_prob_fields(answer)}")
    if args.out:
        write_array(args.out, log_prob, column="log_prob")
        print(f"wrote {args.out}")
    return 0


def _log_prob_grid(args: argparse.Namespace) -> int:
    xmin, xmax, ymin, ymax = args.extent
    if not (xmin < xmax and ymin < ymax):
        raise UsageError(f"log-prob: --extent wants XMIN < XMAX and YMIN < YMAX, got {args.extent}")
    samples = read_points(args.samples, "--samples") if args.samples else None
    n = args.resolution
    # Cell centres: the midpoint rule, so sum(density) * cell area estimates the mass in the box.
    hx, hy = (xmax - xmin) / n, (ymax - ymin) / n
    xs = xmin + hx * (np.arange(n) + 0.5)
    ys = ymin + hy * (np.arange(n) + 0.5)
    gx, gy = np.meshgrid(xs, ys)
    points = np.column_stack([gx.ravel(), gy.ravel()])
    with _client(args) as client:
        if args.model:
            dim = client.model(args.model).get("dim")
            if dim != 2:
                raise UsageError(f"log-prob --grid: model {args.model} has dim {dim}, needs 2")
        log_prob, answer = _log_prob_batched(client, points, args.batch_rows, args)
    density = np.exp(log_prob).reshape(n, n)
    mass = float(density.sum() * hx * hy)
    title = f"density, model {answer.get('model')}, mass {mass:.4f}"
    plot_density(args.plot, density, (xmin, xmax, ymin, ymax), samples, title)
    print(f"grid: {n} x {n} over [{xmin:g}, {xmax:g}] x [{ymin:g}, {ymax:g}]")
    print(f"  integrated mass {mass:.4f}")
    print(f"  {_log_prob_fields(answer)}")
    print(f"wrote {args.plot}")
    if args.out:
        write_array(args.out, density)
        print(f"wrote {args.out}")
    return 0


def cmd_serve(argv: list[str]) -> int:
    from service.server import main as serve

    return serve(argv)


def cmd_train(argv: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "training.train", *argv])


def cmd_package(argv: list[str]) -> int:
    from service.package import main as package

    return package(argv)


# --------------------------------------------------------------------------------------------
# Parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument(
        "--url",
        default=os.environ.get("FLOW_URL", DEFAULT_URL),
        help="server base URL (env FLOW_URL; default %(default)s)",
    )
    group.add_argument(
        "--api-key",
        default=os.environ.get("FLOW_API_KEY") or None,
        help="bearer key when the server has one (env FLOW_API_KEY)",
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        default=300.0,
        help="seconds per HTTP attempt (default %(default)s)",
    )


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _model_flags(parser: argparse.ArgumentParser, *, seed: bool = True) -> None:
    parser.add_argument("--model", help="model name (default: the server's default model)")
    parser.add_argument("--num-steps", type=_positive_int, help="solver steps K")
    parser.add_argument("--solver", choices=SOLVER_NAMES, help="ODE solver (server default: euler)")
    if seed:
        parser.add_argument("--seed", type=int, help="seed (default: a fresh one, printed)")
    parser.add_argument(
        "--labels",
        help="class-conditional models: a class (index or name) for every row, or a "
        "comma-separated list, each asked for num-samples / len(list) rows",
    )
    parser.add_argument(
        "--condition", help="vector-conditional models: one comma-separated vector for every row"
    )
    parser.add_argument(
        "--guidance", type=_non_negative_float, help="guidance scale w (default: the model's)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="flowserve", description="Serve and call flow-matching models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("serve", help="start the server (flags of python -m service)")
    commands.add_parser("train", help="train a model (flags of python -m training.train)")
    commands.add_parser(
        "package", help="make a model folder from any TorchScript field (see flowserve package -h)"
    )

    sample = commands.add_parser("sample", help="draw samples from a running server")
    _model_flags(sample)
    sample.add_argument("--num-samples", type=_positive_int, help="rows to draw")
    sample.add_argument("--x0", metavar="FILE", help="start points (.npy or .csv) instead of p0")
    sample.add_argument("--out", metavar="FILE", help="write the samples (.npy or .csv)")
    sample.add_argument("--plot", metavar="PNG", help="scatter plot of the samples")
    _connection_flags(sample)
    sample.set_defaults(handler=cmd_sample)

    trajectory = commands.add_parser("trajectory", help="fetch ODE paths from a running server")
    _model_flags(trajectory)
    trajectory.add_argument("--num-samples", type=_positive_int, help="paths to draw")
    trajectory.add_argument("--stride", type=_positive_int, help="keep every k-th state")
    trajectory.add_argument("--x0", metavar="FILE", help="start points (.npy or .csv)")
    trajectory.add_argument("--out", metavar="FILE", help="write the states (.npy or .csv)")
    trajectory.add_argument("--plot", metavar="PNG", help="plot of the paths")
    _connection_flags(trajectory)
    trajectory.set_defaults(handler=cmd_trajectory)

    encode = commands.add_parser("encode", help="map data points back to the source (t = 0)")
    _model_flags(encode, seed=False)
    encode.add_argument("--x", required=True, metavar="FILE", help="points (.npy or .csv)")
    encode.add_argument("--out", metavar="FILE", help="write the latents (.npy or .csv)")
    encode.add_argument("--plot", metavar="PNG", help="scatter plot of the latents")
    _connection_flags(encode)
    encode.set_defaults(handler=cmd_encode)

    log_prob = commands.add_parser("log-prob", help="model log-density of points, or a 2-D map")
    _model_flags(log_prob)
    log_prob.add_argument("--x", metavar="FILE", help="points (.npy or .csv)")
    log_prob.add_argument(
        "--divergence",
        choices=("exact", "hutchinson"),
        help="trace estimator (server default: exact up to dim 16, hutchinson above)",
    )
    log_prob.add_argument("--num-probes", type=_positive_int, help="Hutchinson probes")
    log_prob.add_argument(
        "--grid", action="store_true", help="evaluate the density on a grid and draw a heat map"
    )
    log_prob.add_argument(
        "--extent",
        nargs=4,
        type=float,
        default=(-8.0, 8.0, -8.0, 8.0),
        metavar=("XMIN", "XMAX", "YMIN", "YMAX"),
        help="grid box (default -8 8 -8 8)",
    )
    log_prob.add_argument(
        "--resolution", type=_positive_int, default=200, help="N for an N x N grid (default 200)"
    )
    log_prob.add_argument(
        "--batch-rows",
        type=_positive_int,
        default=2000,
        help="points per request; halved when the server answers 413 (default 2000)",
    )
    log_prob.add_argument("--samples", metavar="FILE", help="points drawn over the heat map")
    log_prob.add_argument(
        "--plot", metavar="PNG", default="density.png", help="heat map (default density.png)"
    )
    log_prob.add_argument(
        "--out", metavar="FILE", help="write log_prob (n,), or the density grid (.npy or .csv)"
    )
    _connection_flags(log_prob)
    log_prob.set_defaults(handler=cmd_log_prob)
    return parser


def _check_paths(args: argparse.Namespace) -> None:
    """Output paths are checked before any request, so a typo costs no server time."""
    _check_output(getattr(args, "out", None), "--out", ARRAY_SUFFIXES)
    if args.command != "log-prob" or args.grid:
        _check_output(getattr(args, "plot", None), "--plot", (".png",))


_PASSTHROUGH: dict[str, Callable[[list[str]], int]] = {
    "serve": cmd_serve,
    "train": cmd_train,
    "package": cmd_package,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flowserve` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASSTHROUGH:
        # Everything after the sub-command belongs to the server or trainer's own parser.
        return _PASSTHROUGH[argv[0]](argv[1:])
    try:
        args = build_parser().parse_args(argv)
        _check_paths(args)
        return args.handler(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:
        # --help: argparse has printed it.
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
