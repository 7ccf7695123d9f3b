"""AscendPlatform: Huawei Ascend NPUs through torch_npu (HCCL for collectives).

torch_npu is imported lazily on first use, never at module import (see quantrt.platforms.ascend).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from quantrt.platform.interface import DeviceCapability, Platform
from quantrt.platforms.ascend import import_torch_npu


class AscendPlatform(Platform):
    """Ascend NPU. No compute capability: SGLang skips capability checks on NPU."""

    name: ClassVar[str] = "npu"
    device_type: ClassVar[str] = "npu"
    dist_backend: ClassVar[str] = "hccl"
    linear_kernels_ref: ClassVar[str | None] = "quantrt.platforms.ascend.kernels:NPU_LINEAR_KERNELS"
    moe_kernels_ref: ClassVar[str | None] = "quantrt.platforms.ascend.moe_kernels:NPU_MOE_KERNELS"
    decode_attention_ref: ClassVar[str | None] = "quantrt.platforms.ascend.attention:npu_decode_attention"
    extend_attention_ref: ClassVar[str | None] = "quantrt.platforms.ascend.attention:npu_extend_attention"

    def __init__(self) -> None:
        self._npu_mod: Any = None

    def _npu(self) -> Any:
        """`torch.npu`, importing torch_npu first (once)."""
        if self._npu_mod is None:
            self._npu_mod = import_torch_npu().npu
        return self._npu_mod

    def device(self, index: int = 0) -> torch.device:
        self._npu()  # the "npu" device type exists only once torch_npu is loaded
        return torch.device("npu", index)

    def device_count(self) -> int:
        return int(self._npu().device_count())

    def memory_info(self) -> tuple[int, int]:
        free, total = self._npu().mem_get_info()
        return int(free), int(total)

    def capability(self) -> DeviceCapability | None:
        return None

    def device_name(self) -> str:
        return str(self._npu().get_device_name())

    def synchronize(self) -> None:
        self._npu().synchronize()

    def default_mem_fraction(self) -> float:
        return 0.8

    def npu_ops(self) -> Any:
        """The torch_npu ops the NPU kernels call (quantrt.platforms.ascend.npu_adapter)."""
        from quantrt.platforms.ascend.npu_adapter import TorchNpuOps

        return TorchNpuOps()

    def topk_op(self) -> Any:
        """MoE routing through torch_npu's gating ops (quantrt.platforms.ascend.attention.NpuTopK)."""
        from quantrt.platforms.ascend.attention import npu_topk_op

        return npu_topk_op(self)
