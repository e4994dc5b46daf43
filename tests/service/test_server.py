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
