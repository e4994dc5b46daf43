"""python -m service's process set-up: flags, one-line errors, the allocator."""

from __future__ import annotations

import platform

import pytest

from service.process import keep_freed_memory
from service.server import main


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_allocator_thresholds() -> None:
    assert keep_freed_memory() is True


def test_an_invalid_setting_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert err == "flowserve: error: port: Input should be less than or equal to 65535\n"


def test_an_unknown_flag_value_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "argument --device: invalid choice: 'tpu'" in err


def test_several_fronts_without_an_engine_process_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOW_HTTP_WORKERS", "2")
    monkeypatch.setenv("FLOW_ENGINE", "thread")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err == (
        "flowserve: error: http_workers: 2 fronts need FLOW_ENGINE=process (fronts with an "
        "engine each would not batch each other's requests)\n"
    )
