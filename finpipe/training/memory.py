"""Peak memory of one piece of work inside a longer-lived process.

``ru_maxrss`` is the process-lifetime high-water mark: after the largest model it stops moving, so several
trainings or variants measured one after another in one process need their own sampler.
"""

from __future__ import annotations

import threading


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
