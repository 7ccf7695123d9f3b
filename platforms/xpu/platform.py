"""XpuPlatform: Intel GPUs through torch.xpu (XCCL for collectives)."""

from __future__ import annotations

from typing import ClassVar

import torch

from quantrt.platform.interface import Platform


class XpuPlatform(Platform):
    """Intel XPU (Data Center GPU Max, Arc). No compute capability."""

    name: ClassVar[str] = "xpu"
    device_type: ClassVar[str] = "xpu"
    dist_backend: ClassVar[str] = "xccl"
    linear_kernels_ref: ClassVar[str | None] = "quantrt.platforms.xpu.xpu_kernels:XPU_LINEAR_KERNELS"

    def device_count(self) -> int:
        return torch.xpu.device_count()

    def memory_info(self) -> tuple[int, int]:
        if hasattr(torch.xpu, "mem_get_info"):
            free, total = torch.xpu.mem_get_info()
            return int(free), int(total)
        total = torch.xpu.get_device_properties(0).total_memory
        return int(total - torch.xpu.memory_reserved()), int(total)

    def device_name(self) -> str:
        return torch.xpu.get_device_name()

    def synchronize(self) -> None:
        torch.xpu.synchronize()

    def default_mem_fraction(self) -> float:
        return 0.8
