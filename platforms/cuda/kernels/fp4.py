"""`TritonFp4Kernel`: NVFP4 (e2m1, block 16, e4m3 scales, fp32 global scale) and MXFP4 (e2m1, block 32,
e8m0 scales) weight-only GEMM for CUDA/ROCm without FP4 tensor cores: dequantized in registers.

Serves every format that becomes a `MicroWeight` (modelopt_fp4, compressed-tensors nvfp4-pack-quantized,
gpt-oss mxfp4). The canonical weight holds decoded fp32 block scales; `pack_micro_weight` re-encodes them
as one byte per block when that is exact (e8m0 for powers of two, e4m3 times one per-tensor factor),
else keeps fp32 (4 bytes per block: slower, still exact).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantrt.platforms.cuda.kernels._common import check_runtime
from quantrt.quant.kernel import LinearKernel, LinearSpec
from quantrt.quant.weights import ActKind, MicroWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

DEQUANT_MIN_M = 64  # from here: dequantize to [K, N] bf16 + cuBLAS
SCALE_E8M0, SCALE_E4M3, SCALE_F32 = 0, 1, 2
_E4M3_MAX = 448.0


def _e8m0_bytes(s: torch.Tensor) -> torch.Tensor | None:
    """Scales that are all 0 or powers of two 2**-126..2**127 -> bytes log2(s) + 127 (0 for zero)."""
    if bool((s < 0).any()):
        return None
    mant, exp = torch.frexp(s)
    pos = s > 0
    if not bool(((mant == 0.5) | ~pos).all()):
        return None
    b = torch.where(pos, exp.to(torch.int64) - 1 + 127, torch.zeros_like(exp, dtype=torch.int64))
    if bool(((b < 1) & pos).any()) or bool((b > 254).any()):
        return None
    return b.to(torch.uint8)


def _e4m3_bytes(s: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """(e4m3 bytes, factor) with e4m3(byte) * factor == s to fp32 rounding. Factor 1 first (modelopt keeps
    the global scale apart); else compressed-tensors folded 1/global_scale into the scales, and the largest
    scale is some e4m3 value v times the factor: try factor = max / v for every v (448 first), each
    screened on a few scales before the full check."""
    smax = float(s.abs().max()) if s.numel() else 0.0
    if smax == 0.0:
        return None
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = sorted({float(v) for v in grid if torch.isfinite(v) and v > 0}, reverse=True)
    flat = s.flatten()
    probe = flat[:: max(1, flat.numel() // 64)]

    def fits(t: torch.Tensor, g: float) -> torch.Tensor | None:
        e = (t / g).to(torch.float8_e4m3fn)
        back = e.to(torch.float32) * g
        ok = bool(torch.isfinite(back).all()) and bool(((back - t).abs() <= 1e-6 * t.abs()).all())
        return e if ok else None

    for g in [1.0] + [smax / v for v in vals]:
        if fits(probe, g) is not None and (e := fits(s, g)) is not None:
            return e.view(torch.uint8), g
    return None


def pack_micro_weight(w: MicroWeight) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """MicroWeight -> (packed [K/8, N] int32, scale [K/B, N] uint8 or fp32, scale kind, post).

    Code k = 8*j + i sits in bits [4i, 4i+4) of packed row j; post is the global scale times the e4m3 factor.
    """
    n, k = w.shape
    codes = w.codes.to(torch.int64)
    if int(codes.min()) < 0 or int(codes.max()) > 15:
        raise ValueError("fp4 codes must be 0..15 (e2m1 with the sign in bit 3)")
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * 4
    words = (codes.reshape(n, k // 8, 8) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    packed = words.to(torch.int32).t().contiguous()                   # [K/8, N]
    s = w.scale.to(torch.float32)                                     # [N, K/B]
    post = float(w.global_scale) if w.global_scale is not None else 1.0
    b = _e8m0_bytes(s)
    if b is not None:
        return packed, b.t().contiguous(), SCALE_E8M0, post
    e = _e4m3_bytes(s)
    if e is not None:
        return packed, e[0].t().contiguous(), SCALE_E4M3, post * e[1]
    return packed, s.t().contiguous(), SCALE_F32, post


class TritonFp4Kernel(LinearKernel):
    """fp4 e2m1 weights with micro-block scales, fp16/bf16 activations, fp32 accumulation."""

    name = "triton_fp4"

    def __init__(self, spec: LinearSpec, packed: torch.Tensor, scale: torch.Tensor, scale_kind: int,
                 post: float) -> None:
        self.shape, self.compute_dtype = spec.weight.shape, spec.compute_dtype  # (N, K); no canonical weight
        self.packed, self.scale, self.scale_kind, self.post = packed, scale, scale_kind, post
        self.block = spec.weight.block

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        w = spec.weight
        if not isinstance(w, MicroWeight):
            return False, f"weight is {type(w).__name__}, not MicroWeight"
        if spec.act.kind is not ActKind.NONE:
            return False, f"activations are quantized ({spec.act}); this kernel is weight-only (no FP4 MMA on Hopper)"
        return check_runtime(w.codes, spec.compute_dtype)

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> TritonFp4Kernel:
        w = spec.weight
        assert isinstance(w, MicroWeight)
        return cls(spec, *pack_micro_weight(w))

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from quantrt.platforms.cuda.kernels.fp4_triton import fp4_dequantize, fp4_matmul

        n, k = self.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k).to(self.compute_dtype)                          # [M, K]
        if x2.shape[0] >= DEQUANT_MIN_M:
            w = fp4_dequantize(self.packed, self.scale, self.block, self.scale_kind, self.post, x2.dtype)
            y = torch.nn.functional.linear(x2, w.t())                           # w: [K, N] -> [M, N]
        else:
            y = fp4_matmul(x2, self.packed, self.scale, self.block, self.scale_kind, self.post)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, n)
