"""CPU linear kernels, in preference order (`CPU_LINEAR_KERNELS`).

CPU has no fast fp8 matmul (`torch._scaled_mm` ~160 ms at 4096², reference/CPU.md), but every
e4m3/e5m2 value is exact in fp32. `CpuFp8EmulatedKernel` dequantizes the weight once into fp32
(codes x scale: the same fp32 product the reference kernel computes on every call), fake-quantizes the
activations per call with the reference quantizers, and runs one fp32 GEMM. It therefore matches the
reference kernel up to GEMM summation order (~1e-6 relative), for per-tensor, per-channel and
128x128-block weights with dynamic per-token, per-token-group or static activations.

Why fp32 and not bf16 storage (2-core AVX2 box, torch 2.13; see docs in the module's report):
fp32 F.linear beats bf16 at M=16 by 2-5x on every shape, and at M=1 on SmolLM2 shapes (576..1536);
bf16 only wins at M=1 for 4096x4096 (memory-bound), and its bf16 output rounding (~4e-3) would
break agreement with the reference. torch has no bf16-in/fp32-out mm on CPU (`aten::mm.dtype`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from quantrt.quant.kernel import LinearKernel, LinearSpec
from quantrt.quant.quantize import FP8_DTYPES, fake_quantize_act
from quantrt.quant.weights import ActKind, DenseWeight, FloatWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

_COMPUTE = (torch.float32, torch.bfloat16, torch.float16)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedGemm:
    """fp32 y = x @ W^T + b through oneDNN with W reordered once into its blocked layout.

    On this AVX2 box oneDNN's packed sgemm is 1.3-2.8x faster than F.linear (MKL) at M=1..300 for
    SmolLM2 shapes (576x3072: 0.51 vs 1.10 ms at M=16; 576x49152: 13 vs 31 ms). Falls back to
    F.linear where oneDNN is unavailable.
    """

    def __init__(self, weight: torch.Tensor):
        # weight: [N, K] fp32
        self.n = weight.shape[0]
        self.packed = None
        if onednn_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
            except RuntimeError:
                self.packed = None
        self.weight = None if self.packed is not None else weight

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [..., K] fp32 -> [..., N] fp32
        if self.packed is None:
            return F.linear(x, self.weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


class CpuDenseKernel(LinearKernel):
    """Unquantized fp32 weights through the packed oneDNN GEMM."""

    name = "cpu_dense_onednn"

    def __init__(self, gemm: PackedGemm):
        self.gemm = gemm

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        if not isinstance(spec.weight, DenseWeight):
            return False, f"weight is {type(spec.weight).__name__}, not DenseWeight"
        if spec.compute_dtype is not torch.float32:
            return False, f"compute dtype {spec.compute_dtype}: oneDNN packing here serves float32 only"
        if not onednn_available():
            return False, "torch was built without oneDNN (mkldnn)"
        return True, ""

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> CpuDenseKernel:
        return cls(PackedGemm(spec.weight.data.to(torch.float32).contiguous()))

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.gemm(x, bias)


class CpuFp8EmulatedKernel(LinearKernel):
    """fp8 (FloatWeight) on CPU: weight dequantized once to fp32, activations fake-quantized per call."""

    name = "cpu_fp8_emulated"

    def __init__(self, spec: LinearSpec, weight: torch.Tensor):
        self.spec = spec
        self.n = weight.shape[0]
        self.gemm = PackedGemm(weight)  # [N, K] fp32 = codes * scale

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        w = spec.weight
        if not isinstance(w, FloatWeight):
            return False, f"weight is {type(w).__name__}, not FloatWeight"
        if w.data.dtype not in FP8_DTYPES:
            return False, f"weight dtype {w.data.dtype} is not an fp8 dtype"
        if w.data.device.type != "cpu":
            return False, f"weight is on {w.data.device.type}, not cpu"
        if spec.act.kind is not ActKind.NONE and spec.act.dtype not in FP8_DTYPES:
            return False, f"activations are {spec.act.dtype}, not fp8"
        if spec.compute_dtype not in _COMPUTE:
            return False, f"compute dtype {spec.compute_dtype} is not float32/bfloat16/float16"
        return True, ""

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> CpuFp8EmulatedKernel:
        # data: [N, K] fp8 -> [N, K] fp32 with the (tensor/channel/block) scale folded in
        return cls(spec, spec.weight.dequantize(torch.float32).contiguous())

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, k = self.n, x.shape[-1]
        lead = x.shape[:-1]
        xq = fake_quantize_act(x.reshape(-1, k), self.spec.act)               # [M, K] fp32
        b = bias.to(torch.float32) if bias is not None else None
        y = self.gemm(xq, b)                                                  # [M, N] fp32
        return y.to(self.spec.compute_dtype).reshape(*lead, n)


CPU_LINEAR_KERNELS: list[type[LinearKernel]] = [CpuDenseKernel, CpuFp8EmulatedKernel]
