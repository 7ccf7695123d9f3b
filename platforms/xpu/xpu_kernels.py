"""Intel XPU linear kernels (`XPU_LINEAR_KERNELS`): the portable Triton kernels shared with CUDA, where they apply.

Triton reaches Intel GPUs through its Intel backend (intel-xpu-backend-for-triton, shipped with torch's XPU
wheels as pytorch-triton-xpu). Of quantrt's CUDA Triton kernels only the plain ones are portable:
- XpuTritonWNA16Kernel: weight-only int4/int8 (AWQ, GPTQ, int4wo, ...) through `wna16_matmul` (tiled, split-K)
  and, from DEQUANT_MIN_M rows, `wna16_dequantize` + torch matmul. The skinny GEMV and the tensor-core path
  of the CUDA kernel are not used (the latter is inline PTX).
- XpuTritonW8A8Kernel: symmetric int8 W8A8 (per-token or static int8 activations) through `w8a8_matmul`.
  fp8 is declined: Intel's Data Center GPU Max / Arc have no fp8 matrix units and fp8 `tl.dot` is unverified
  there, so fp8 checkpoints use the reference kernel.
NOT RUN ON AN INTEL GPU: no XPU exists where quantrt is developed; CI runs these classes under the Triton
interpreter (TRITON_INTERPRET=1, CPU tensors). IPEX is not used: it is retired upstream and its newest
release supports torch 2.8 only.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch

from quantrt.platforms.cuda.kernels._common import interpret_mode
from quantrt.platforms.cuda.kernels.w8a8 import TritonW8A8Kernel
from quantrt.platforms.cuda.kernels.wna16 import DEQUANT_MIN_M, TritonWNA16Kernel
from quantrt.quant.kernel import LinearKernel, LinearSpec
from quantrt.quant.weights import IntWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

_HALF = (torch.float16, torch.bfloat16)


def triton_xpu_backend() -> bool:
    """Triton is installed with its Intel XPU backend (triton.backends.intel)."""
    return importlib.util.find_spec("triton") is not None and \
        importlib.util.find_spec("triton.backends.intel") is not None


def check_xpu_runtime(t: torch.Tensor, compute_dtype: torch.dtype) -> tuple[bool, str]:
    """Triton with the Intel backend and the weight on an XPU, or the interpreter on CPU (tests)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (torch's XPU wheels ship pytorch-triton-xpu)"
    if interpret_mode() and t.device.type == "cpu":
        pass
    elif t.device.type != "xpu":
        return False, f"weight is on {t.device.type}, not an XPU"
    elif not triton_xpu_backend():
        return False, "the installed Triton has no Intel XPU backend (install pytorch-triton-xpu)"
    if compute_dtype not in _HALF:
        return False, f"compute dtype {compute_dtype} is not float16/bfloat16"
    return True, ""


class XpuTritonWNA16Kernel(TritonWNA16Kernel):
    """Weight-only int4/int8 on XPU: the tiled Triton GEMM (and dequantize + matmul for large M)."""

    name = "xpu_triton_wna16"

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        ok, why = super().can_implement(spec, platform)
        if not ok and not why.startswith("weight is on"):
            return False, why
        return check_xpu_runtime(spec.weight.codes, spec.compute_dtype)  # type: ignore[union-attr]

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from quantrt.platforms.cuda.kernels.wna16_triton import wna16_dequantize, wna16_matmul

        k = self.shape[1]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k).to(self.compute_dtype)                           # [M, K]
        if self.perm is not None:
            x2 = x2[:, self.perm]
        if x2.shape[0] >= DEQUANT_MIN_M:
            w = wna16_dequantize(self.packed, self.scale, self.zero, self.group, self.container, x2.dtype,
                                 offset=self.raw_offset, zero_const=self.zero_const)
            y = torch.nn.functional.linear(x2, w.t())                           # w: [K, N]
        else:
            y = wna16_matmul(x2, self.packed, self.scale, self.zero, self.group, self.container,
                             offset=self.raw_offset, zero_const=self.zero_const)
        return self._finish(x2, y, bias, lead)


class XpuTritonW8A8Kernel(TritonW8A8Kernel):
    """int8 W8A8 on XPU through the Triton scaled GEMM (fp8 declined, see the module doc)."""

    name = "xpu_triton_w8a8_int8"

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        if not isinstance(spec.weight, IntWeight):
            return False, (f"{type(spec.weight).__name__}: only int8 W8A8 is shared with XPU (no fp8 matrix "
                           f"units on Intel Data Center GPU Max / Arc; fp8 runs the reference kernel)")
        ok, why = super().can_implement(spec, platform)
        if not ok and not why.startswith("weight is on"):
            return False, why
        return check_xpu_runtime(spec.weight.codes, spec.compute_dtype)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from quantrt.platforms.cuda.kernels.w8a8_triton import w8a8_matmul

        n, k = self.data.shape
        lead = x.shape[:-1]
        y = w8a8_matmul(x.reshape(-1, k).to(self.compute_dtype), self.data, self.w_scale, self.act,
                        self.wscale, self.qmax, self.act_scale)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, n)


XPU_LINEAR_KERNELS: list[type[LinearKernel]] = [XpuTritonWNA16Kernel, XpuTritonW8A8Kernel]
