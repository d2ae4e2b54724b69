"""GPU memory and utilization for the heartbeat, from NVML (the `nvidia-ml-py` package).

On a machine without an NVIDIA GPU or driver the probe says so (`available: false` and the
reason) instead of failing: the CPU worker reports the same fields.
"""

from __future__ import annotations

import os
from typing import Any

try:
    import pynvml
except ImportError:  # nvidia-ml-py not installed
    pynvml = None


class GpuProbe:
    def __init__(self) -> None:
        self._handles: list[tuple[int, Any]] = []
        self.unavailable: str | None = None
        if pynvml is None:
            self.unavailable = "nvidia-ml-py is not installed"
            return
        try:
            pynvml.nvmlInit()
            self._handles = _visible_devices()
        except pynvml.NVMLError as exc:
            self.unavailable = f"NVML: {exc}"
            return
        if not self._handles:
            self.unavailable = "no NVIDIA GPU visible"

    def read(self) -> dict[str, Any]:
        """A blocking NVML query (well under a millisecond per GPU): call it off the event loop."""
        if self.unavailable is not None:
            return {"available": False, "reason": self.unavailable}
        devices = []
        try:
            for index, handle in self._handles:
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
                devices.append({
                    "index": index,
                    "name": pynvml.nvmlDeviceGetName(handle),
                    "memory_used_bytes": int(memory.used),
                    "memory_total_bytes": int(memory.total),
                    "utilization": utilization.gpu / 100,
                })
        except pynvml.NVMLError as exc:  # a GPU fell off the bus, a driver reload, ...
            return {"available": False, "reason": f"NVML: {exc}"}
        return {"available": True, "devices": devices}


def _visible_devices() -> list[tuple[int, Any]]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES (indices or UUIDs) when set, else all."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())]
    handles = []
    for position, item in enumerate(entry.strip() for entry in visible.split(",") if entry.strip()):
        if item.isdigit():
            handles.append((position, pynvml.nvmlDeviceGetHandleByIndex(int(item))))
        else:
            handles.append((position, pynvml.nvmlDeviceGetHandleByUUID(item)))
    return handles
