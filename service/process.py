"""Process set-up shared by every process that serves: `python -m service`, its engine process
and its HTTP fronts (and any host that runs the app, such as a Ray Serve replica)."""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import shutil
import tempfile

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest on 64-bit systems
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks for reuse instead of handing them back to the OS.

    Every forward pass allocates and frees activations of a few MB. By default glibc serves
    those with fresh mappings or trims them off its heap at once (madvise), so each pass pays
    page faults again: the 65,536 x 100 benchmark request took 3.8 s that way and 2.3 s with both
    thresholds raised (either one alone is slower still, as setting one turns off glibc's
    adaptive threshold). The price: up to TRIM_THRESHOLD_BYTES of freed memory stays resident.
    Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def use_process_metrics() -> str:
    """Have every process of this service write its Prometheus values into one folder, so that
    /metrics sums them whichever front answers (prometheus_client's multiprocess mode).

    Must run before prometheus_client is imported. A folder an operator set in
    PROMETHEUS_MULTIPROC_DIR is kept; else a fresh one is made and removed at exit."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        folder = tempfile.mkdtemp(prefix="flowserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
