"""The README's promises: two commands first, CI runs the test one, every setting is listed,
and the serve command really serves the bundled model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.conftest import REPO_ROOT, free_port

README = (REPO_ROOT / "README.md").read_text()


def first_commands() -> list[str]:
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", README, re.S)
    assert block, "README.md has no code block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands() -> None:
    assert first_commands() == ["make serve", "make test"]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    commands = [
        line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert first_commands()[1] in commands


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_in_the_settings_table(name: str) -> None:
    assert f"| `FLOW_{name.upper()}` |" in README


@pytest.mark.e2e
def test_the_readme_serve_command_serves_the_bundled_model(tmp_path: Path) -> None:
    up_to_date = subprocess.run(["make", "-q", "setup"], cwd=REPO_ROOT, check=False)
    if up_to_date.returncode != 0:
        pytest.skip("the virtual environment is not set up by `make setup` here")
    if not (REPO_ROOT / "models" / "four-gaussians" / "model.pt").exists():
        pytest.skip("models/four-gaussians is not there")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_")}
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [*first_commands()[0].split(), f"PORT={port}"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # make and its python child form one group to stop together
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "make serve did not become ready"
            time.sleep(0.2)
        answer = httpx.post(f"{url}/sample", json={"num_samples": 5, "num_steps": 10, "seed": 1})
        assert answer.status_code == 200
        assert answer.json()["model"] == "four-gaussians"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
