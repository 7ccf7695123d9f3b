"""CUDA linear kernels in preference order (`CUDA_LINEAR_KERNELS`), found by `CudaPlatform`.

Importing this module does not import Triton; each kernel's `can_implement` says when Triton is absent.
"""

from __future__ import annotations

from quantrt.platforms.cuda.kernels.fp4 import TritonFp4Kernel
from quantrt.platforms.cuda.kernels.w8a8 import TritonW8A8Kernel
from quantrt.platforms.cuda.kernels.wna16 import TritonWNA16Kernel
from quantrt.quant.kernel import LinearKernel

CUDA_LINEAR_KERNELS: list[type[LinearKernel]] = [TritonWNA16Kernel, TritonW8A8Kernel, TritonFp4Kernel]

__all__ = ["CUDA_LINEAR_KERNELS", "TritonFp4Kernel", "TritonW8A8Kernel", "TritonWNA16Kernel"]
