"""How far training is: a progress bar on a terminal, and plain lines everywhere else (a log
file, a pipe, a container's output), so a long run is never silent."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

LINE_EVERY_S = 10.0
"""Seconds between two progress lines when the output is not a terminal."""


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Reports steps of a run of `total`.

    mode: "bar" (tqdm on stderr), "lines" (one line on `out` every `every` seconds, and one at
    the end: step, loss, rate, time left), "off", or None: a bar when stderr is a terminal,
    lines otherwise.
    """

    def __init__(
        self,
        total: int,
        mode: str | None = None,
        *,
        out: TextIO | None = None,
        every: float = LINE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if mode is None:
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.total = total
        self.mode = mode
        self.out = out
        self.every = every
        self.clock = clock
        self.started = clock()
        self.last_line = self.started
        self.bar = tqdm(total=total, desc="training", dynamic_ncols=True) if mode == "bar" else None

    def update(self, step: int, loss: float, lr: float) -> None:
        """Step `step` (1-based) is done; `loss` is a smoothed loss, `lr` the learning rate."""
        if self.bar is not None:
            self.bar.update(1)
            if step % 50 == 0 or step == self.total:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            return
        now = self.clock()
        if self.mode == "lines" and (now - self.last_line >= self.every or step == self.total):
            self.last_line = now
            self._line(step, loss, lr, now)

    def _line(self, step: int, loss: float, lr: float, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = step / elapsed
        left = (self.total - step) / rate if rate > 0 else 0.0
        print(
            f"training: step {step}/{self.total} ({100 * step / self.total:.0f}%)  "
            f"loss {loss:.4f}  lr {lr:.2e}  {rate:.1f} steps/s  "
            f"elapsed {_duration(elapsed)}  left {_duration(left)}",
            file=self.out or sys.stdout,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
