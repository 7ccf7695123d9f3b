"""CUDA linear and MoE kernels in preference order (`CUDA_LINEAR_KERNELS`, `CUDA_MOE_KERNELS`), found by
`CudaPlatform`.

Importing this module does not import Triton; each kernel's `can_implement` says when Triton is absent.
"""

from __future__ import annotations

from quantrt.platforms.cuda.kernels.dense_gemv import TritonDenseGemvKernel
from quantrt.platforms.cuda.kernels.fp4 import TritonFp4Kernel
from quantrt.platforms.cuda.kernels.moe import TritonMoEKernel
from quantrt.platforms.cuda.kernels.w8a8 import TritonW8A8Kernel
from quantrt.platforms.cuda.kernels.wna16 import TritonWNA16Kernel
from quantrt.quant.kernel import LinearKernel
from quantrt.quant.moe_kernel import MoEKernel

CUDA_LINEAR_KERNELS: list[type[LinearKernel]] = [TritonWNA16Kernel, TritonW8A8Kernel, TritonFp4Kernel,
                                                  TritonDenseGemvKernel]
CUDA_MOE_KERNELS: list[type[MoEKernel]] = [TritonMoEKernel]

__all__ = ["CUDA_LINEAR_KERNELS", "CUDA_MOE_KERNELS", "TritonDenseGemvKernel", "TritonFp4Kernel", "TritonMoEKernel", "TritonW8A8Kernel", "TritonWNA16Kernel"]
