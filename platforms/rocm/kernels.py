"""ROCm linear kernels in preference order (`ROCM_LINEAR_KERNELS`).

First the aiter kernels (active only with SGLANG_USE_AITER=1 / QUANTRT_USE_AITER=1; they decline
otherwise), Petit for NVFP4 (petit_nvfp4), then the Triton kernels shared with CUDA. The Triton kernels are portable Triton (no inline
PTX) and take the platform's fp8 dtype (e4m3fnuz on MI300) from the weight. Not yet run on AMD hardware.
"""

from __future__ import annotations

from quantrt.platforms.cuda.kernels import TritonW8A8Kernel, TritonWNA16Kernel
from quantrt.platforms.rocm.aiter_kernels import AITER_LINEAR_KERNELS, AiterFp8Kernel, AiterInt8Kernel
from quantrt.platforms.rocm.petit import PetitNvfp4Kernel
from quantrt.quant.kernel import LinearKernel

ROCM_LINEAR_KERNELS: list[type[LinearKernel]] = [*AITER_LINEAR_KERNELS, PetitNvfp4Kernel, TritonWNA16Kernel,
                                                 TritonW8A8Kernel]

__all__ = ["ROCM_LINEAR_KERNELS", "AiterFp8Kernel", "AiterInt8Kernel"]
