"""bench.throughput: the baseline's maths, its weight transfer, and a smoke run at tiny sizes.

No assertion here is about speed: the figures' values depend on the machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_model_dir

from bench import throughput
from bench.throughput import Figure, NotPostArchitecture, PostFlow, Sizes

TINY = Sizes(
    steps=4,
    large_rows=256,
    small_rows=4,
    small_requests=3,
    concurrency=4,
    load_seconds=1.0,
    hol_large_rows=1024,
    hol_small_rows=4,
    hol_small_steps=2,
    hol_small_requests=3,
    memory_rows=2048,
    matmul_size=64,
    matmul_reps=1,
    repeats=1,
    check_rows=8,
    cuda_rows=512,
    cuda_small_steps=(2, 6),
    cuda_small_requests=2,
)


def constant_flow(dim: int, velocity: list[float]) -> PostFlow:
    """The post's network with v(t, x) = velocity: every weight zero, the last bias set."""
    flow = PostFlow([dim + 1, 8, 8, dim])
    with torch.no_grad():
        for linear in flow.linears():
            linear.weight.zero_()
            linear.bias.zero_()
        flow.linears()[-1].bias.copy_(torch.tensor(velocity))
    return flow


@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_post_sample_moves_a_constant_field_exactly_one_velocity(num_steps: int) -> None:
    x0 = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    states = throughput.post_sample(constant_flow(2, [0.5, -2.0]), x0, num_steps)
    assert states.shape == (num_steps + 1, 6, 2)
    torch.testing.assert_close(states[0], x0)
    torch.testing.assert_close(states[-1], x0 + torch.tensor([0.5, -2.0]))


def test_post_sample_matches_an_independent_euler_loop() -> None:
    torch.manual_seed(0)
    flow = PostFlow([3, 16, 16, 2]).eval()
    x0 = torch.randn(32, 2)
    x = x0.clone()
    with torch.no_grad():
        for k in range(7):
            x = x + flow(torch.full((32, 1), k / 7), x) / 7
    torch.testing.assert_close(throughput.post_sample(flow, x0, 7)[-1], x, rtol=0, atol=1e-6)


def test_baseline_takes_the_served_models_weights(tmp_path: Path) -> None:
    folder = throughput.write_post_model(tmp_path, "post", dim=3, seed=5)
    scripted = torch.jit.load(str(folder / "model.pt"))
    flow = throughput.load_post_flow(folder / "model.pt", torch.device("cpu"))
    t, x = torch.rand(10, 1), torch.randn(10, 3)
    with torch.no_grad():
        torch.testing.assert_close(flow(t, x), scripted(t, x))
    assert [(m.in_features, m.out_features) for m in flow.linears()] == [
        (4, 64),
        (64, 64),
        (64, 64),
        (64, 3),
    ]


class TimeFirst(torch.nn.Module):
    """Same shapes as the post's network, but fed cat([t, x]): its weights mean something else."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ELU(), torch.nn.Linear(8, 2))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([t, x], dim=-1))


def _scripted(root: Path, module: torch.nn.Module) -> Path:
    torch.jit.save(torch.jit.script(module), str(root / "model.pt"))
    return root / "model.pt"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: write_model_dir(root, "scaled") / "model.pt", "no parameters"),
        (lambda root: _scripted(root, TimeFirst()), "does not reproduce the model"),
        (
            lambda root: _scripted(root, torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False))),
            r"not \(weight, bias\) pairs",
        ),
    ],
)
def test_baseline_refuses_models_of_another_architecture(tmp_path: Path, make, message) -> None:
    with pytest.raises(NotPostArchitecture, match=message):
        throughput.load_post_flow(make(tmp_path), torch.device("cpu"))


def test_flops_count_every_multiply_add_of_the_post_network() -> None:
    flow = PostFlow([3, 64, 64, 64, 2])
    assert throughput.flops_per_row_eval(flow) == 2 * (3 * 64 + 2 * 64 * 64 + 64 * 2)


@pytest.mark.parametrize(
    ("flowserve", "baseline", "bar", "higher_is_better", "passed"),
    [
        (3.0, 1.0, 1.5, True, True),
        (1.0, 1.0, 1.5, True, False),
        (0.05, 1.0, 0.1, False, True),
        (0.2, 1.0, 0.1, False, False),
        (0.2, 1.0, None, False, None),
    ],
)
def test_a_figure_passes_on_the_right_side_of_its_bar(
    flowserve: float, baseline: float, bar: float | None, higher_is_better: bool, passed
) -> None:
    figure = Figure("f", "u", flowserve, baseline, "b", bar, higher_is_better)
    assert figure.ratio == flowserve / baseline
    assert figure.passed is passed


@pytest.mark.e2e
def test_every_case_runs_against_a_real_server(tmp_path: Path) -> None:
    models = tmp_path / "models"
    throughput.write_post_model(models, "post")
    results = throughput.run_bench(
        device="cpu",
        sizes=TINY,
        cases=throughput.ALL_CASES,  # the GPU's figures too, here on the CPU
        models_dir=models,
        workdir=tmp_path,
        fresh_memory_server=False,
        say=lambda line: None,
    )
    kinds = [f["name"].split(" ")[0] for f in results["figures"]]
    assert kinds == [
        *("agreement", "1.", "FLOP/s", "FLOP/s", "2.", "3.", "L.", "L.", "4."),
        *("cpu:", "cpu:", "5."),
    ]
    for figure in results["figures"]:
        assert isinstance(figure["flowserve"], float) and math.isfinite(figure["flowserve"])
        assert isinstance(figure["baseline"], float) and math.isfinite(figure["baseline"])
        assert figure["passed"] in (True, False, None)
        assert figure["name"] in results["table"]
    assert results["figures"][0]["passed"] is True  # the served numbers are the post's
    assert len(results["details"]["head_of_line"]["small_s"]) == TINY.hol_small_requests
    # LitServe answered the same load, and the same samples for one seed.
    litserve = results["details"]["litserve"]
    assert litserve["litserve"]["ok"] > 0 and litserve["same_seed_max_abs_gap"] < 1e-4
    json.loads(json.dumps(results))


def test_engine_loop_runs_and_reports_both_fields(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import engine_loop

    model = Path(__file__).resolve().parents[2] / "models" / "four-gaussians"
    sizes = ["--jobs", "4", "--rows", "4", "--steps", "4", "--seconds", "0.05"]
    threads = torch.get_num_threads()
    engine_loop.main(["--model-dir", str(model), *sizes])
    assert torch.is_grad_enabled() and torch.get_num_threads() == threads  # left as it found them
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # the header, then one line per run
    assert all("served field:" in line and "instant field:" in line for line in lines[1:])
