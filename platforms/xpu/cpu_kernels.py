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
from quantrt.quant.weights import ActKind, DenseWeight, FloatWeight, IntWeight

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
        self.act, self.compute_dtype = spec.act, spec.compute_dtype  # not the spec: no canonical weight
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
        xq = fake_quantize_act(x.reshape(-1, k), self.act)                    # [M, K] fp32
        b = bias.to(torch.float32) if bias is not None else None
        y = self.gemm(xq, b)                                                  # [M, N] fp32
        return y.to(self.compute_dtype).reshape(*lead, n)


CPU_LINEAR_KERNELS: list[type[LinearKernel]] = [CpuDenseKernel, CpuFp8EmulatedKernel]


# ---- integer weights (w8a8_int8, torchao int8wo/int8dq/int4wo, compressed-tensors int) ---------------
# Measured on the 2-core AVX2 box (reference/CPU.md, torch 2.13): bf16 `aten._weight_int8pack_mm` is the
# fastest weight-only int8 path at small M (1.4 ms vs 4.3 ms fp32 F.linear at M=1, 4096²) but no faster
# than fp32 at M=32; for W8A8 int8, fake-quantized activations through the packed fp32 GEMM beat
# `torch._int_mm` (exact int32 accumulation) by 2-12x at every M (column-major B: 9.7 / 247 ms at M=1 / 32
# against 4.3 / 20 ms fp32), so the emulated path is the fast one here and it equals the reference kernel
# up to fp32 summation order.
INT8PACK_MAX_M = 16  # rows up to which bf16 _weight_int8pack_mm is used; above it the packed fp32 GEMM


def _int_weight_problem(spec: LinearSpec) -> str:
    w = spec.weight
    if not isinstance(w, IntWeight):
        return f"weight is {type(w).__name__}, not IntWeight"
    if w.codes.device.type != "cpu":
        return f"weight is on {w.codes.device.type}, not cpu"
    if spec.compute_dtype not in _COMPUTE:
        return f"compute dtype {spec.compute_dtype} is not float32/bfloat16/float16"
    return ""


class CpuInt8WeightOnlyKernel(LinearKernel):
    """Symmetric per-channel int8 weights, float activations: bf16 `aten._weight_int8pack_mm` for
    M <= INT8PACK_MAX_M (relative error ~3e-3 from rounding activations to bf16), the packed fp32 GEMM
    over the dequantized weight above it (kept only when the compute dtype is float32)."""

    name = "cpu_int8_weight_only"

    def __init__(self, spec: LinearSpec, codes: torch.Tensor, scale: torch.Tensor, gemm: PackedGemm | None):
        self.compute_dtype = spec.compute_dtype  # not the spec: its fp32 scales are not needed
        self.codes = codes   # [N, K] int8
        self.scale = scale   # [N] bf16
        self.gemm = gemm     # fp32 packed dequantized weight, or None

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        why = _int_weight_problem(spec)
        if why:
            return False, why
        w = spec.weight
        if w.bits != 8 or w.codes.dtype != torch.int8 or w.group_size != w.shape[1]:
            return False, f"needs per-channel signed int8 codes (got {w.bits}-bit {w.codes.dtype}, group {w.group_size})"
        if w.zero is not None or w.offset is not None or w.g_idx is not None:
            return False, "needs symmetric weights without zero point or act-order"
        if spec.act.kind is not ActKind.NONE:
            return False, f"activations are quantized ({spec.act}); this kernel is weight-only"
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return False, "torch lacks aten._weight_int8pack_mm"
        return True, ""

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> CpuInt8WeightOnlyKernel:
        w = spec.weight
        gemm = PackedGemm(w.dequantize(torch.float32).contiguous()) if spec.compute_dtype is torch.float32 else None
        return cls(spec, w.codes.contiguous(), w.scale.reshape(-1).to(torch.bfloat16).contiguous(), gemm)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, k = self.codes.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)                                                  # [M, K]
        if self.gemm is not None and x2.shape[0] > INT8PACK_MAX_M:
            y = self.gemm(x2.to(torch.float32), None if bias is None else bias.to(torch.float32))
            return y.to(self.compute_dtype).reshape(*lead, n)
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.codes, self.scale)
        if self.compute_dtype != torch.bfloat16:
            y = y.to(self.compute_dtype)                                       # [M, N]
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, n)


class CpuIntEmulatedKernel(LinearKernel):
    """Any IntWeight (bits 2-8, groups, zero/offset, act-order) with weight-only or int8 activations:
    the weight is dequantized once to fp32 (the reference kernel's own product), activations are
    fake-quantized per call, one packed fp32 GEMM. Matches the reference up to summation order."""

    name = "cpu_int_emulated"

    def __init__(self, spec: LinearSpec, weight: torch.Tensor):
        self.act, self.compute_dtype = spec.act, spec.compute_dtype  # not the spec: no canonical weight
        self.n = weight.shape[0]
        self.gemm = PackedGemm(weight)  # [N, K] fp32

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        why = _int_weight_problem(spec)
        if why:
            return False, why
        if spec.act.kind is not ActKind.NONE and spec.act.dtype != torch.int8:
            return False, f"activations are {spec.act.dtype}, not int8"
        return True, ""

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> CpuIntEmulatedKernel:
        return cls(spec, spec.weight.dequantize(torch.float32).contiguous())

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        k = x.shape[-1]
        lead = x.shape[:-1]
        xq = fake_quantize_act(x.reshape(-1, k), self.act)                    # [M, K] fp32
        y = self.gemm(xq, None if bias is None else bias.to(torch.float32))   # [M, N] fp32
        return y.to(self.compute_dtype).reshape(*lead, self.n)


CPU_LINEAR_KERNELS += [CpuInt8WeightOnlyKernel, CpuIntEmulatedKernel]

# ---- sub-8-bit integer and codebook weights (AWQ, GPTQ, auto-round, GGUF, bitsandbytes) -------------
from quantrt.platforms.xpu.cpu_int_kernels import CPU_INT_KERNELS  # noqa: E402

CPU_LINEAR_KERNELS[2:2] = CPU_INT_KERNELS  # after dense and fp8, before the generic int kernels
