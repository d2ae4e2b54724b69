"""When interactive work on an engine counts as served, across the front-end processes that feed it.

Each front-end (worker/frontends.py) admits its own jobs, but they share one engine and so one step time:
an interactive job on front-end 1 is slowed by the batch jobs of front-end 2 as much as by its own. So each
front-end writes, in its own slot of a small memory-mapped file, the moment its interactive work counts as
served (+inf while it holds some), and each reads the latest of all slots before it admits batch jobs. The
front-ends of an engine always share a host; a write is a store into shared memory, no system call and no
Redis round trip, and the monotonic clock is the same in every process of a host (CLOCK_MONOTONIC).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import tempfile
from pathlib import Path

_SLOT = struct.Struct("d")  # one float64 per front-end: a monotonic time, +inf while interactive work is held
_RUN_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def board_path(loader_pid: int, model: str) -> Path:
    """One file per model per loading worker process (its front-ends know its pid): never shared with an
    earlier run of the same worker id."""
    digest = hashlib.sha256(f"{loader_pid}:{model}".encode()).hexdigest()[:16]
    return _RUN_DIR / f"llm-fleet-interactive-{digest}"


class InteractiveBoard:
    """One engine's slots; this process writes slot `index` and reads all of them."""

    def __init__(self, path: Path, count: int, index: int) -> None:
        self.path = path
        self._index = index
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < count * _SLOT.size:  # the loading worker made it; this guards a race
                os.ftruncate(fd, count * _SLOT.size)
            self._map = mmap.mmap(fd, count * _SLOT.size)
        finally:
            os.close(fd)
        self._count = count

    @classmethod
    def create(cls, path: Path, count: int) -> InteractiveBoard:
        """The loading worker's board (slot 0), every slot cleared: made before its front-ends start."""
        path.unlink(missing_ok=True)
        return cls(path, count, 0)

    def publish(self, served_at: float) -> None:
        _SLOT.pack_into(self._map, self._index * _SLOT.size, served_at)

    def served_at(self) -> float:
        """The latest moment any front-end's interactive work counts as served (+inf: some is running)."""
        return max(_SLOT.unpack_from(self._map, i * _SLOT.size)[0] for i in range(self._count))

    def remove(self) -> None:
        """Delete the file (the loading worker, at unload). The mapping stays valid for a job still ending."""
        self.path.unlink(missing_ok=True)
