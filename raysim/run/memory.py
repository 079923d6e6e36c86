"""Peak memory of the whole run: this process and every process it started (with an
embedded Ray: GCS, raylet, the driver actor and the workers), sampled in a thread.
PSS counts shared pages (torch's libraries, the object store) once, not per process."""
from __future__ import annotations

import threading

import psutil


def tree_memory_mb(root: psutil.Process, kind: str = "pss") -> float:
    """PSS (shared pages split among their users) or USS (pages no other process maps:
    unaffected by unrelated processes coming and going, so best for trends)."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            total += getattr(info, kind, info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total / 2**20


class PeakMemorySampler:
    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._root = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="raysim-memory")

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> float:
        self.peak_mb = max(self.peak_mb, tree_memory_mb(self._root))
        return self.peak_mb

    def __enter__(self) -> "PeakMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
