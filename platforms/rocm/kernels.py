"""ROCm linear kernels in preference order (`ROCM_LINEAR_KERNELS`).

First the aiter kernels (active only with SGLANG_USE_AITER=1 / QUANTRT_USE_AITER=1; they decline
otherwise), Petit for NVFP4 (petit_nvfp4), then the Triton kernels shared with CUDA in their ROCm form:
- RocmTritonWNA16Kernel: the CUDA W4A16/W8A16 kernel without its tensor-core path (inline PTX); the
  tiled, skinny and dequantize paths are plain Triton.
- RocmTritonW8A8Kernel: fp8 weights become e4m3fnuz on MI300 (scales x2, static input scales x2,
  FORMATS.md fact 7) so activations quantize on the fnuz grid (max 240); int8 is unchanged.
Not yet run on AMD hardware (CI runs them under the Triton interpreter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantrt.platforms.cuda.kernels import TritonW8A8Kernel, TritonWNA16Kernel
from quantrt.platforms.rocm.aiter_kernels import AITER_LINEAR_KERNELS, AiterFp8Kernel, AiterInt8Kernel
from quantrt.platforms.rocm.fnuz import weight_to_fnuz
from quantrt.platforms.rocm.petit import PetitNvfp4Kernel
from quantrt.quant.kernel import LinearKernel, LinearSpec
from quantrt.quant.weights import FloatWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform


class RocmTritonWNA16Kernel(TritonWNA16Kernel):
    """The shared W4A16/W8A16 Triton kernel minus the inline-PTX tensor-core path (NVIDIA only)."""

    name = "rocm_triton_wna16"

    def _tc_ok(self, m: int, k: int) -> bool:
        return False


class RocmTritonW8A8Kernel(TritonW8A8Kernel):
    """The shared W8A8 Triton kernel with fp8 weights in the platform's fp8 (e4m3fnuz on MI300)."""

    name = "rocm_triton_w8a8"

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> TritonW8A8Kernel:
        w = spec.weight
        fnuz = getattr(platform, "is_fp8_fnuz", lambda: False)()
        if not (fnuz and isinstance(w, FloatWeight) and w.data.dtype == torch.float8_e4m3fn):
            return super().prepare(spec, platform)
        k = super().prepare(LinearSpec(weight_to_fnuz(w), spec.act, spec.compute_dtype), platform)
        if k.act_scale is not None:
            k.act_scale = k.act_scale * 2.0  # static input scales double with the weights (fact 7)
        return k


ROCM_LINEAR_KERNELS: list[type[LinearKernel]] = [*AITER_LINEAR_KERNELS, PetitNvfp4Kernel, RocmTritonWNA16Kernel,
                                                 RocmTritonW8A8Kernel]

__all__ = ["ROCM_LINEAR_KERNELS", "AiterFp8Kernel", "AiterInt8Kernel", "RocmTritonW8A8Kernel", "RocmTritonWNA16Kernel"]
