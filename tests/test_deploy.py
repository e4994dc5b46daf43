"""Dockerfile and docker-compose.yml: parsed and checked, and the image's command run directly.

No Docker engine runs here, so the image is never built in the suite: the checks read the files,
and the Dockerfile's CMD is run as a plain process on this machine's Python.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, free_port, running_server

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "docker-compose.yml"
BUNDLED_MODEL = REPO_ROOT / "models" / "four-gaussians"
FOUR_MEANS = np.array([[4.0, 4.0], [-4.0, 4.0], [-4.0, -4.0], [4.0, -4.0]])


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def first_index(instructions: list[tuple[str, str]], keyword: str, needle: str = "") -> int:
    for index, (name, args) in enumerate(instructions):
        if name == keyword and needle in args:
            return index
    raise AssertionError(f"no {keyword} containing {needle!r} in the Dockerfile")


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


# --------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_base_and_cuda_torch(instructions: list[tuple[str, str]]) -> None:
    assert instructions[0] == ("FROM", "python:3.11-slim")
    torch = instructions[first_index(instructions, "RUN", "torch==")][1]
    # The default PyPI wheel is the CUDA build; TORCH_PIP_ARGS may name a CPU index instead.
    assert "pip install ${TORCH_PIP_ARGS} torch==2.13.0" in torch
    assert ("ARG", 'TORCH_PIP_ARGS=""') in instructions


def test_dockerfile_installs_locked_dependencies_before_copying_code(
    instructions: list[tuple[str, str]],
) -> None:
    lock = first_index(instructions, "COPY", "requirements.lock")
    install = first_index(instructions, "RUN", "pip install -r requirements.lock")
    code = first_index(instructions, "COPY", "service/")
    package = first_index(instructions, "RUN", "pip install --no-deps .")
    assert lock < install < code < package
    copies_before_install = [args for name, args in instructions[:install] if name == "COPY"]
    assert copies_before_install == ["requirements.lock requirements-ray.lock ./"]
    ray = instructions[install][1]
    assert 'if [ "$EXTRAS" = "ray" ]; then pip install -r requirements-ray.lock' in ray
    assert ("ARG", 'EXTRAS=""') in instructions


def test_the_lock_files_pin_every_dependency_but_torch() -> None:
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {
            re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements
        }

    def pinned(lock: str) -> set[str]:
        lines = (REPO_ROOT / lock).read_text().splitlines()
        return {line.split("==")[0].lower() for line in lines if "==" in line and line[0] != " "}

    runtime = names(project["dependencies"]) - {"torch"}
    dev = names(project["optional-dependencies"]["dev"])
    ray = names(project["optional-dependencies"]["ray"])
    assert runtime <= pinned("requirements.lock")
    assert runtime | ray <= pinned("requirements-ray.lock")
    assert runtime | dev | ray <= pinned("requirements-dev.lock")
    locks = ("requirements.lock", "requirements-ray.lock", "requirements-dev.lock")
    assert not any("torch" in pinned(lock) for lock in locks)


def test_dockerfile_runs_as_non_root_with_the_models(instructions: list[tuple[str, str]]) -> None:
    users = [args for name, args in instructions if name == "USER"]
    assert users, "no USER: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    models = instructions[first_index(instructions, "COPY", "/models")][1]
    assert models.startswith("--chown=") and models.endswith("models/ /models/")
    pristine = instructions[first_index(instructions, "COPY", "/opt/flowserve/models/")][1]
    assert pristine.startswith("--chown=")
    assert first_index(instructions, "USER") > first_index(instructions, "RUN", "pip install")


def test_dockerfile_command_healthcheck_and_port(instructions: list[tuple[str, str]]) -> None:
    cmd = json.loads(instructions[first_index(instructions, "CMD")][1])
    assert cmd == [
        "python",
        "-m",
        "service",
        "--models-dir",
        "/models",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]
    healthcheck = instructions[first_index(instructions, "HEALTHCHECK")][1]
    probe = json.loads(healthcheck[healthcheck.index("CMD") + len("CMD") :])
    assert probe[:2] == ["python", "-c"] and "/readyz" in probe[2]
    compile(probe[2], "<healthcheck>", "exec")
    assert ("EXPOSE", "8000") in instructions
    env = " ".join(args for name, args in instructions if name == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env


def test_dockerignore_keeps_the_context_small_but_ships_models() -> None:
    ignored = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "**/__pycache__", ".pytest_cache", "tests"} <= ignored
    assert not ignored & {"models", "models/", "service", "training", "pyproject.toml"}


# --------------------------------------------------------------------------------------------
# docker-compose.yml


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service["deploy"]["resources"]["reservations"]["devices"]


def models_mount(service: dict[str, Any]) -> dict[str, Any]:
    (mount,) = [v for v in service["volumes"] if v["target"] == "/models"]
    return mount


@pytest.mark.parametrize("name", ["api", "train"])
def test_compose_reserves_one_nvidia_gpu(compose: dict[str, Any], name: str) -> None:
    assert gpu_devices(compose["services"][name]) == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]


def test_compose_api_serves_read_only_models_with_healthcheck(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert api["build"] == "."
    mount = models_mount(api)
    assert (mount["type"], mount["source"], mount["read_only"]) == ("volume", "models", True)
    assert "models" in compose["volumes"]
    env = api["environment"]
    assert env["FLOW_DEVICE"] == "cuda"
    assert env["FLOW_MODELS_DIR"] == "/models"
    # Passed through from the shell only when set there: the service refuses an empty key.
    assert "FLOW_API_KEY" in env and env["FLOW_API_KEY"] is None
    # Loopback unless the operator exposes it (FLOW_BIND=0.0.0.0, with FLOW_API_KEY set).
    assert api["ports"] == ["${FLOW_BIND:-127.0.0.1}:8000:8000"]
    test = api["healthcheck"]["test"]
    assert test[0] == "CMD" and any("/readyz" in part for part in test)
    assert api["restart"] == "unless-stopped"


@pytest.mark.parametrize("name", ["api", "train", "seed-models"])
def test_compose_hardening(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    assert service["read_only"] is True
    assert "/tmp" in service["tmpfs"]
    assert "no-new-privileges:true" in service["security_opt"]


def test_compose_train_profile_writes_into_the_models_volume(compose: dict[str, Any]) -> None:
    train = compose["services"]["train"]
    assert train["profiles"] == ["train"]
    assert train["image"] == compose["services"]["api"]["image"]
    mount = models_mount(train)
    assert (mount["source"], mount.get("read_only", False)) == ("models", False)
    command = train["command"]
    assert command[:3] == ["python", "-m", "training.train"]
    out = command[command.index("--out") + 1]
    assert out.startswith("/models/")
    # Any config of the mounted folder, chosen with TRAIN_CONFIG.
    config = command[command.index("--config") + 1]
    assert config == "/configs/${TRAIN_CONFIG:-four-gaussians.json}"
    (configs,) = [v for v in train["volumes"] if v["target"] == "/configs"]
    assert (configs["type"], configs["source"], configs["read_only"]) == (
        "bind",
        "./training/configs",
        True,
    )
    assert (REPO_ROOT / "training" / "configs" / "four-gaussians.json").is_file()


def test_compose_adds_the_models_of_a_newer_image_to_the_volume(compose: dict[str, Any]) -> None:
    seed = compose["services"]["seed-models"]
    # cp -n: a folder that is in the volume is never overwritten, missing ones are added.
    assert seed["command"] == ["sh", "-c", "cp -rn /opt/flowserve/models/. /models/"]
    mount = models_mount(seed)
    assert (mount["source"], mount["read_only"]) == ("models", False)
    api = compose["services"]["api"]
    assert api["depends_on"] == {"seed-models": {"condition": "service_completed_successfully"}}


# --------------------------------------------------------------------------------------------
# The image's command, run here


@pytest.mark.e2e
def test_dockerfile_command_serves_the_bundled_model(
    instructions: list[tuple[str, str]], tmp_path: Path
) -> None:
    if not (BUNDLED_MODEL / "model.pt").is_file():
        pytest.skip("models/four-gaussians has not been trained and committed yet")
    port = free_port()
    cmd = json.loads(instructions[first_index(instructions, "CMD")][1])
    substitutes = {"python": sys.executable, "/models": str(REPO_ROOT / "models")}
    command = [substitutes.get(part, part) for part in cmd]
    command[command.index("--port") + 1] = str(port)
    command[command.index("--host") + 1] = "127.0.0.1"
    env = {"FLOW_DEVICE": "cpu"}
    with running_server(command, port, tmp_path / "server.log", env=env) as url:
        assert httpx.get(f"{url}/readyz").status_code == 200
        answer = httpx.post(
            f"{url}/sample",
            json={"model": "four-gaussians", "num_samples": 400, "num_steps": 50, "seed": 0},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        samples = np.asarray(answer.json()["samples"])
    assert samples.shape == (400, 2)
    # Every mode of the target is hit, and most samples land near one.
    nearest = np.linalg.norm(samples[:, None, :] - FOUR_MEANS[None], axis=2)
    assert set(nearest.argmin(axis=1)) == {0, 1, 2, 3}
    assert np.mean(nearest.min(axis=1) < 2.5) > 0.9
