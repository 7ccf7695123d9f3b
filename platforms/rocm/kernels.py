"""ROCm linear kernels (`ROCM_LINEAR_KERNELS`): the Triton kernels shared with CUDA.

They are written in portable Triton (no inline PTX); the fp8 paths take the platform's fp8 dtype
(e4m3fnuz on MI300) from the weight. Not yet run on AMD hardware.
"""

from __future__ import annotations

from quantrt.platforms.cuda.kernels import TritonW8A8Kernel, TritonWNA16Kernel
from quantrt.quant.kernel import LinearKernel

ROCM_LINEAR_KERNELS: list[type[LinearKernel]] = [TritonWNA16Kernel, TritonW8A8Kernel]
