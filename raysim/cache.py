"""Where raysim caches what it derives (pre-trained bases, dataset conversions, image scans)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("RAYSIM_CACHE", Path.home() / ".cache" / "raysim"))
