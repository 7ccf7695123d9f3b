"""The Triton kernels shared with CUDA that ROCm registers after its own (`ROCM_LINEAR_KERNELS_ALL`,
`ROCM_MOE_KERNELS_ALL`, named by RocmPlatform).

Checked for ROCm: `fp4_triton` (NVFP4/MXFP4 linears) and `moe_triton` (fused MoE) are plain Triton (bit
operations and tl.dot, no inline asm, no CUDA-only intrinsics), so they run as they are:
- RocmTritonFp4Kernel: NVFP4/MXFP4 weight-only linears (the CUDA kernel; weights dequantized in registers).
- RocmTritonMoEKernel: the fused MoE kernel, except fp8 experts on fnuz archs (gfx942: the kernel reads
  e4m3fn weights, MI300's fp8 is e4m3fnuz; aiter's fused_moe serves those when aiter is on).
Paged decode attention is already shared (RocmPlatform.decode_attention_ref falls back to the Triton kernel).
Not yet run on AMD hardware (CI runs them under the Triton interpreter with a faked ROCm platform).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quantrt.platforms.cuda.kernels.fp4 import TritonFp4Kernel
from quantrt.platforms.cuda.kernels.moe import TritonMoEKernel
from quantrt.platforms.rocm.aiter_moe import ROCM_MOE_KERNELS
from quantrt.platforms.rocm.kernels import ROCM_LINEAR_KERNELS
from quantrt.quant.weights import FloatWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform
    from quantrt.quant.kernel import LinearKernel
    from quantrt.quant.moe_kernel import MoEKernel, MoESpec


class RocmTritonFp4Kernel(TritonFp4Kernel):
    """The shared NVFP4/MXFP4 Triton linear (plain Triton: runs on ROCm unchanged)."""

    name = "rocm_triton_fp4"


class RocmTritonMoEKernel(TritonMoEKernel):
    """The shared fused-MoE Triton kernel; declines fp8 experts on fnuz archs (MI300)."""

    name = "rocm_triton_moe"

    @classmethod
    def can_implement(cls, spec: MoESpec, platform: Platform) -> tuple[bool, str]:
        ok, why = super().can_implement(spec, platform)
        if ok and isinstance(spec.experts[0][0], FloatWeight) and getattr(platform, "is_fp8_fnuz", lambda: False)():
            return False, (f"fp8 experts on {getattr(platform, 'arch', lambda: '?')()}: the Triton MoE kernel reads "
                           f"e4m3fn weights, this arch's fp8 is e4m3fnuz (aiter fused_moe serves them with aiter on)")
        return ok, why


ROCM_LINEAR_KERNELS_ALL: list[type[LinearKernel]] = [*ROCM_LINEAR_KERNELS, RocmTritonFp4Kernel]
ROCM_MOE_KERNELS_ALL: list[type[MoEKernel]] = [*ROCM_MOE_KERNELS, RocmTritonMoEKernel]

__all__ = ["ROCM_LINEAR_KERNELS_ALL", "ROCM_MOE_KERNELS_ALL", "RocmTritonFp4Kernel", "RocmTritonMoEKernel"]
