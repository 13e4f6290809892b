"""Peak memory of one piece of work inside a longer-lived process, and the kernel caches that made training's grow.

``ru_maxrss`` is the process-lifetime high-water mark: after the largest model it stops moving, so several
trainings or variants measured one after another in one process need their own sampler.
"""

from __future__ import annotations

import os
import threading

#: matmul kernels oneDNN (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and PyTorch's ideep layer (``LRU_CACHE_CAPACITY``) each
#: keep, one per distinct shape (default 1,024 each). Training meets a new sequence length at almost every step: with
#: the defaults a SmolLM2 step added ~14 MB of resident memory that never came back (1,007 -> 1,441 MB over 30 steps;
#: the Quickstart's ~200 steps see ~130 lengths). A step's shapes need ~30 kernels (a cap of 16 recompiled 200 of them
#: in every step); capped at 64 the RSS stayed flat, at 256 it levelled off 145 MB higher, at the same speed (2-core
#: AMD EPYC, 2026-12-04).
MATMUL_CACHE_CAPACITY = 128


def cap_matmul_caches(capacity: int = MATMUL_CACHE_CAPACITY) -> None:
    """Bound both kernel caches (a value already set in the environment wins). Each is sized once, at the process's
    first oneDNN matmul: call this before any model computes."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(capacity))


def _rss_kb() -> int:
    """This process's resident set size (VmRSS, KiB), 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssPeak:
    """Peak RSS above the starting RSS while the block runs, sampled from a daemon thread every ``interval`` s.
    ``ru_maxrss`` is a process-lifetime high-water mark and cannot separate several trainings in one process."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.baseline_kb = self.peak_kb = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kb = max(self.peak_kb, _rss_kb())

    def __enter__(self) -> "RssPeak":
        self.baseline_kb = self.peak_kb = _rss_kb()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_kb = max(self.peak_kb, _rss_kb())

    @property
    def delta_mb(self) -> float:
        return max(0, self.peak_kb - self.baseline_kb) / 1024
