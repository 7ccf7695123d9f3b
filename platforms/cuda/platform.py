"""CudaPlatform: NVIDIA GPUs through torch.cuda (NCCL for collectives)."""

from __future__ import annotations

from typing import ClassVar

import torch

from quantrt.platform.interface import DeviceCapability, Platform


class CudaPlatform(Platform):
    """NVIDIA CUDA. `capability`/`name` may be injected so tests run without a GPU."""

    name: ClassVar[str] = "cuda"
    device_type: ClassVar[str] = "cuda"
    dist_backend: ClassVar[str] = "nccl"
    linear_kernels_ref: ClassVar[str | None] = "quantrt.platforms.cuda.kernels:CUDA_LINEAR_KERNELS"

    def __init__(self, capability: DeviceCapability | None = None, device_name: str | None = None) -> None:
        self._capability = capability
        self._device_name = device_name

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def memory_info(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info()
        return int(free), int(total)

    def capability(self) -> DeviceCapability | None:
        if self._capability is None:
            major, minor = torch.cuda.get_device_capability()
            self._capability = DeviceCapability(major, minor)
        return self._capability

    def device_name(self) -> str:
        if self._device_name is None:
            self._device_name = torch.cuda.get_device_name()
        return self._device_name

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        cap = self.capability()
        sm = cap.to_int() if cap else 0
        dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16)
        if sm >= 80:
            dtypes += (torch.bfloat16,)
        if sm >= 89:
            dtypes += (torch.float8_e4m3fn, torch.float8_e5m2)
        return dtypes

    def default_mem_fraction(self) -> float:
        return 0.88

    def attention_backends(self) -> list[str]:
        return ["triton", "torch_sdpa"]
