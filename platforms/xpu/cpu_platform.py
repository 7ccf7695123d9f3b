"""CpuPlatform: the always-available fallback (gloo for collectives, torch threads for compute)."""

from __future__ import annotations

import importlib.util
import platform as _pyplatform
from pathlib import Path
from typing import ClassVar

import torch

from quantrt.platform.interface import Platform


class CpuPlatform(Platform):
    """Plain CPU. `cpuinfo`/`meminfo` paths may be injected for tests."""

    name: ClassVar[str] = "cpu"
    device_type: ClassVar[str] = "cpu"
    dist_backend: ClassVar[str] = "gloo"
    allowed_quantization: ClassVar[frozenset[str] | None] = None  # every method has a reference path
    linear_kernels_ref: ClassVar[str | None] = "quantrt.platforms.xpu.cpu_kernels:CPU_LINEAR_KERNELS"
    moe_kernels_ref: ClassVar[str | None] = "quantrt.platforms.xpu.cpu_moe_kernels:CPU_MOE_KERNELS"

    def __init__(
        self,
        cpuinfo: str | Path = "/proc/cpuinfo",
        meminfo: str | Path = "/proc/meminfo",
        use_psutil: bool = True,
    ) -> None:
        self._cpuinfo = Path(cpuinfo)
        self._meminfo = Path(meminfo)
        self._use_psutil = use_psutil and importlib.util.find_spec("psutil") is not None

    def memory_info(self) -> tuple[int, int]:
        """(available, total) bytes of system memory."""
        if self._use_psutil:
            import psutil

            vm = psutil.virtual_memory()
            return int(vm.available), int(vm.total)
        fields: dict[str, int] = {}
        for line in self._meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key.strip()] = int(parts[0]) * 1024  # values are in kB
        total = fields["MemTotal"]
        return fields.get("MemAvailable", fields.get("MemFree", 0)), total

    def device_name(self) -> str:
        """The CPU model string ("model name" in /proc/cpuinfo), else what Python's platform says."""
        try:
            for line in self._cpuinfo.read_text(errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model Name", "cpu model", "Processor") and value.strip():
                    return value.strip()
        except OSError:
            pass
        return _pyplatform.processor() or _pyplatform.machine() or "cpu"

    def num_threads(self) -> int:
        """Threads torch uses for intra-op parallelism."""
        return torch.get_num_threads()

    def default_mem_fraction(self) -> float:
        return 0.5
