"""`flowserve package`: turn any TorchScript velocity field into a model folder the service loads.

    flowserve package MODEL.pt --out models/NAME [--shape 1,28,28] [--inputs x,t]
        [--time-shape -1] [--source normal | normal:STD | MIXTURE.json]
        [--classes a,b,c [--null K]] [--condition-dim K [--null-vector 0,0,...]]
        [--guidance-scale W] [--data-range LO HI] [--force]

The file may come from anywhere (torchcfm, facebookresearch/flow_matching or a user's own code,
scripted by its user): the manifest says how to call it, and the same checks the service runs at
load time run here first (argument count, probes at several batch sizes, output shape and dtype,
and here also finite outputs), so a folder this writes is one the service serves. The folder is
written atomically (`service.artifact`); an existing one is replaced only with `--force`. Errors
are one line naming the flag or the problem, exit code 2.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from service.artifact import check_destination, check_name, write_artifact_dir
from service.cli import OneLineParser, UsageError
from service.loader import (
    ModelRefused,
    check_serving_fields,
    checked_field,
    load_module,
)
from service.mixture import GaussianMixture


def _numbers(text: str, flag: str, kind: type = float) -> list:
    try:
        return [kind(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        name = "integers" if kind is int else "numbers"
        raise ValueError(f"{flag}: expected comma-separated {name}, got {text!r}") from None


def source_spec(text: str, dim: int) -> dict[str, Any]:
    """--source: "normal" (N(0, I)), "normal:STD" (N(0, STD^2 I)), a MIXTURE as JSON text, or a
    file holding one; the mixture's dimension must be `dim`."""
    if text == "normal" or text.startswith("normal:"):
        std = 1.0
        if text.startswith("normal:"):
            (std,) = _numbers(text.split(":", 1)[1], "--source") or [float("nan")]
            if not (math.isfinite(std) and std > 0):
                raise ValueError(f"--source: normal:STD wants a positive STD, got {text!r}")
        eye = [[std**2 if i == j else 0.0 for j in range(dim)] for i in range(dim)]
        return {"means": [[0.0] * dim], "covs": [eye], "weights": [1.0]}
    raw: Any
    if text.lstrip().startswith("{"):
        raw = _json(text, "--source")
    else:
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"--source: {text}: no such file (or use normal, normal:STD)")
        raw = _json(path.read_text("utf-8"), f"--source {text}")
    mixture = GaussianMixture.from_spec(raw, field="--source")
    if mixture.dim != dim:
        raise ValueError(
            f"--source: the mixture has dimension {mixture.dim}; the shape holds {dim}"
        )
    return mixture.to_spec()


def _json(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag}: not valid JSON ({exc.msg})") from None


def build_manifest(args: Any) -> dict[str, Any]:
    """The manifest the flags describe (without format, name and sha256)."""
    shape = _numbers(args.shape, "--shape", int)
    if not shape or any(size < 1 for size in shape):
        raise ValueError(f"--shape: expected positive sizes, got {args.shape!r}")
    dim = math.prod(shape)
    manifest: dict[str, Any] = {"dim": dim, "source": source_spec(args.source, dim)}
    if len(shape) > 1:
        manifest["shape"] = shape
    inputs = [part.strip() for part in args.inputs.split(",")]
    if args.classes and args.condition_dim:
        raise ValueError("--classes: a model takes classes or a vector condition, not both")
    conditional = bool(args.classes or args.condition_dim)
    if conditional and "c" not in inputs:
        inputs.append("c")
    if inputs != ["t", "x"]:
        manifest["inputs"] = inputs
    if args.time_shape != "-1,1":
        manifest["time_shape"] = _numbers(args.time_shape, "--time-shape", int)
    if args.classes:
        classes = [name.strip() for name in args.classes.split(",") if name.strip()]
        condition: dict[str, Any] = {"kind": "class", "classes": classes}
        if args.null is not None:
            condition["null"] = args.null
        manifest["condition"] = condition
    elif args.condition_dim:
        condition = {"kind": "vector", "dim": args.condition_dim}
        if args.null_vector is not None:
            condition["null"] = _numbers(args.null_vector, "--null-vector")
        manifest["condition"] = condition
    elif args.null is not None or args.null_vector is not None:
        raise ValueError("--null: only with --classes (--null-vector: with --condition-dim)")
    if args.guidance_scale is not None:
        manifest["guidance_scale"] = args.guidance_scale
    if args.data_range is not None:
        manifest["data_range"] = list(args.data_range)
    return manifest


def package(args: Any) -> dict[str, Any]:
    """Check the model against the manifest the flags describe and write the folder."""
    check_name(args.out)
    check_destination(args.out, args.force)
    source = Path(args.model)
    if not source.is_file():
        raise ValueError(f"MODEL {args.model}: no such file")
    manifest = build_manifest(args)
    signature = check_serving_fields(manifest)
    device = torch.device("cpu")
    try:
        checked_field(load_module(source, device), signature, device, finite=True)
    except ModelRefused as exc:
        raise ValueError(str(exc).replace("model.pt", args.model, 1)) from None
    manifest["packaged_from"] = source.name
    manifest["torch_version"] = torch.__version__
    return write_artifact_dir(args.out, lambda path: shutil.copyfile(source, path), manifest)


def parse_args(argv: list[str]) -> Any:
    parser = OneLineParser(
        prog="flowserve package", description="Package a TorchScript velocity field."
    )
    parser.add_argument("model", metavar="MODEL.pt", help="a TorchScript file")
    parser.add_argument("--out", required=True, help="model folder to write, e.g. models/name")
    parser.add_argument("--shape", required=True, help="shape of one sample, e.g. 2 or 1,28,28")
    parser.add_argument(
        "--inputs", default="t,x", help="forward's argument order: t,x (default), x,t, t,x,c, x,t,c"
    )
    parser.add_argument(
        "--time-shape", default="-1,1", help="-1,1: t of shape (B, 1) (default); -1: (B,)"
    )
    parser.add_argument(
        "--source", default="normal", help="normal (default), normal:STD, or a MIXTURE JSON file"
    )
    parser.add_argument("--classes", help="class names, comma-separated (a class condition)")
    parser.add_argument("--null", type=int, help="the class index the model reads as no class")
    parser.add_argument("--condition-dim", type=int, help="width k of a vector condition")
    parser.add_argument("--null-vector", help="the vector the model reads as no condition")
    parser.add_argument("--guidance-scale", type=float, help="default w of requests")
    parser.add_argument(
        "--data-range", nargs=2, type=float, metavar=("LO", "HI"), help="data range, for pictures"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
        written = package(args)
    except (UsageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shape = written.get("shape", [written["dim"]])
    print(f"wrote {args.out}: shape {shape}, inputs {written.get('inputs', ['t', 'x'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
