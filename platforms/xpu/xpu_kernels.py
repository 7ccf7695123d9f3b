"""Intel XPU linear kernels (`XPU_LINEAR_KERNELS`), in preference order.

Empty for now, on purpose: quantized linears on XPU run the portable reference kernel (dequantize + matmul
through torch.xpu), and unquantized ones the dense F.linear kernel. The Triton kernels of
quantrt.platforms.cuda.kernels are written for CUDA and tested there (and under TRITON_INTERPRET=1); Triton
for XPU (intel-xpu-backend-for-triton) could run them, but no XPU exists here to check it, so they are not
listed until someone runs them on an Intel GPU. IPEX is not used: it is retired upstream and its newest
release supports torch 2.8 only.
"""

from __future__ import annotations

from quantrt.quant.kernel import LinearKernel

XPU_LINEAR_KERNELS: list[type[LinearKernel]] = []
