"""The reference post's sampler served by LitServe, for `bench.throughput`'s case "litserve".

    python -m bench.litserve_app --model-dir models/four-gaussians --port 8001

The same network and weights as the model flowserve serves, the post's Euler sampler, and
LitServe's dynamic batching (`max_batch_size` 64, `batch_timeout` 5 ms): the requests that
arrive together are drawn, concatenated and integrated as one batch, then split. It answers
POST /predict with the body flowserve's /sample takes ({"num_samples", "num_steps", "seed"})
and the same JSON samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import litserve as ls
import torch

from bench.throughput import load_post_flow, post_sample
from service.mixture import GaussianMixture

MAX_BATCH_SIZE = 64
BATCH_TIMEOUT_S = 0.005


class PostSampler(ls.LitAPI):
    def __init__(self, model_dir: Path):
        super().__init__(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S)
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        torch.set_grad_enabled(False)
        self.flow = load_post_flow(self.model_dir / "model.pt", torch.device("cpu"))
        manifest = json.loads((self.model_dir / "manifest.json").read_text())
        self.source = GaussianMixture.from_spec(manifest["source"])

    def decode_request(self, request):  # untyped: LitServe then reads the JSON body
        return int(request["num_samples"]), int(request["num_steps"]), int(request.get("seed", 0))

    def batch(self, inputs: list) -> list:
        return inputs

    def predict(self, requests: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        starts = [
            self.source.sample(rows, torch.Generator().manual_seed(seed))
            for rows, _, seed in requests
        ]
        # One batch per step count (the bench sends one): the post's sampler over all rows.
        out: list[torch.Tensor | None] = [None] * len(requests)
        for steps in {steps for _, steps, _ in requests}:
            chosen = [i for i, (_, k, _) in enumerate(requests) if k == steps]
            samples = post_sample(self.flow, torch.cat([starts[i] for i in chosen]), steps)[-1]
            pieces = torch.split(samples, [requests[i][0] for i in chosen])
            for i, piece in zip(chosen, pieces, strict=True):
                out[i] = piece
        return out

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        return {"samples": output.tolist()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    server = ls.LitServer(PostSampler(args.model_dir), accelerator="cpu", timeout=120)
    server.run(port=args.port, host="127.0.0.1", generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
