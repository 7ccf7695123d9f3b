"""CPU kernel for grouped-int weights on quantrt's own C++ op (`torch.ops.quantrt_cpu.int_gemm`, csrc/int_gemm.cpp).

`CpuNativeIntKernel` repacks an IntWeight once into 32-element blocks, w = q·s + m per block:
  - bits ≤ 4: two codes a byte (GGML Q4 order: byte j = code j | code j+16 << 4), codes 0..15
      signed codes (−8..7):  q + 8, m = −8·s          float offset (Q4_1, Q4_K mins):  m = offset
      integer zero z (AWQ, GPTQ, Q4_0, Q5_0): kept as a uint8 per block, m = −z·s in fp32 in the op
  - bits 5..8: one int8 a code; unsigned codes ≤ 127 as they are (Q5_0/Q5_1 0..31, Q5_K, 7-bit), 8-bit
    unsigned codes shifted by −128 with m = (128 − z)·s (or offset + 128·s)
Groups that are multiples of 32 (64, 128, per-channel) repeat their scale over their 32-blocks. Scales
and float mins are each stored as fp16 when every value round-trips exactly (GGUF d/m, fp16/bf16
checkpoint scales), else fp32. Act-order (g_idx) weights are permuted along K once and x is gathered per call.

The op computes y = Σ_b s·dot(q_b, x_b) + m·Σx_b in fp32 for fp32/bf16/fp16 activations: the value of
dequantize-then-fp32-matmul up to summation order (no activation quantization). M ≤ 16 (decode): the
direct kernel streams the packed bytes once (activation rows in chunks of 4 re-read each weight row from
L1). M > 16 (prefill): tiles of ≤ 64 weight rows dequantized per call into a ≤ 256 KiB fp32 buffer and
multiplied with torch's sgemm (within ~10% of a dense fp32 GEMM, while the model stays packed).

Declined, with the reason: no extension (`cpu_ext.unavailable_reason()`), K or the group not a multiple
of 32 (Q2_K/Q3_K/Q6_K 16-element sub-blocks), act-order groups of unequal size, quantized activations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantrt.platforms.xpu import cpu_ext
from quantrt.platforms.xpu.cpu_int_kernels import _act_order, _common_checks
from quantrt.quant.kernel import LinearKernel, LinearSpec
from quantrt.quant.weights import IntWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

BLOCK = 32


def _fp16_if_exact(*ts: torch.Tensor | None) -> torch.dtype:
    """float16 when every tensor round-trips through fp16 exactly, else float32."""
    for t in ts:
        if t is not None and not torch.equal(t.to(torch.float16).to(torch.float32), t):
            return torch.float32
    return torch.float16


def _codes_and_min(w: IntWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(q [N, K] int32 in the stored range, s [N, G] fp32, min [N, G] (fp32 additive min, uint8 zero
    point with min = -z·s, or None), storage bits 4|8)."""
    q = w.codes.to(torch.int32)
    s = w.scale.to(torch.float32)
    signed = w.codes.dtype == torch.int8
    if w.zero is not None and not signed and w.bits < 8 and 0 <= int(w.zero.min()) and int(w.zero.max()) <= 255:
        return q, s, w.zero.to(torch.uint8), (4 if w.bits <= 4 else 8)   # codes fit as they are
    if w.zero is not None:
        m = -w.zero.to(torch.float32) * s
    elif w.offset is not None:
        m = w.offset.to(torch.float32)
    else:
        m = None
    if w.bits <= 4:
        if signed:                                   # -8..7 -> 0..15, w = (q' - 8)·s
            q, m = q + 8, (-8 * s if m is None else m - 8 * s)
        return q, s, m, 4
    if not signed and w.bits == 8:                   # 8-bit unsigned -> int8, w = (q' + 128)·s + m
        q, m = q - 128, (128 * s if m is None else m + 128 * s)
    return q, s, m, 8


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    # q: [N, K] int32 0..15 -> [N, K/2] uint8; per 32-block byte j = q[j] | q[j+16] << 4
    n, k = q.shape
    b = q.to(torch.uint8).view(n, k // BLOCK, 2, BLOCK // 2)
    return (b[:, :, 0, :] | (b[:, :, 1, :] << 4)).reshape(n, k // 2).contiguous()


class CpuNativeIntKernel(LinearKernel):
    """IntWeight (bits 2..8, groups of 32·j, sym/asym/offset, act-order) on quantrt_cpu::int_gemm."""

    name = "cpu_native_int"

    def __init__(self, qs: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int,
                 n: int, perm: torch.Tensor | None, out_dtype: torch.dtype):
        self.qs, self.scales, self.mins, self.bits = qs, scales, mins, bits
        self.n, self.perm, self.out_dtype = n, perm, out_dtype
        if not cpu_ext.load():
            raise RuntimeError(f"cpu_native_int needs the native CPU extension: {cpu_ext.unavailable_reason()}")
        self.op = torch.ops.quantrt_cpu.int_gemm

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        why = _common_checks(spec)
        if why:
            return False, why
        w: IntWeight = spec.weight  # type: ignore[assignment]
        n, k = w.shape
        if k % BLOCK:
            return False, f"K={k} is not a multiple of {BLOCK}"
        if w.group_size % BLOCK:
            return False, (f"group size {w.group_size} is not a multiple of {BLOCK} "
                           f"(the native kernel handles 32, 64, 128, ... and per-channel)")
        try:
            _act_order(w)
        except ValueError as e:
            return False, str(e)
        reason = cpu_ext.unavailable_reason()
        if reason is not None:
            return False, f"native CPU extension unavailable: {reason}"
        return True, ""

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> CpuNativeIntKernel:
        w: IntWeight = spec.weight  # type: ignore[assignment]
        n, _ = w.shape
        q, s, m, bits = _codes_and_min(w)                                     # [N, K], [N, G], [N, G]
        perm = _act_order(w)
        if perm is not None:   # sort K by group: column j of the new layout is old column perm[j]
            q = q[:, perm]
            first = w.g_idx.long()[perm][::w.group_size]                      # [G] group of each sorted group
            s, m = s[:, first], (m[:, first] if m is not None else None)
        rep = w.group_size // BLOCK
        s = s.repeat_interleave(rep, 1)                                       # [N, K/32]
        m = m.repeat_interleave(rep, 1) if m is not None and bool(m.any()) else None
        if m is not None and m.dtype != torch.uint8:
            m = m.to(_fp16_if_exact(m))                                       # scales and mins each fp16
        qs = _pack_nibbles(q) if bits == 4 else q.to(torch.int8).contiguous()  # [N, K/2] u8 | [N, K] i8
        mins = m.contiguous() if m is not None else None                      # where exact, else fp32
        return cls(qs, s.to(_fp16_if_exact(s)).contiguous(), mins, bits, n, perm, spec.compute_dtype)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])                  # [M, K]
        if self.perm is not None:
            x2 = x2[:, self.perm]
        if bias is not None and bias.dtype not in (torch.float32, x2.dtype):  # the op takes fp32 or x's dtype
            bias = bias.to(torch.float32)
        y = self.op(x2, self.qs, self.scales, self.mins, self.bits, bias)       # [M, N] x.dtype
        if y.dtype != self.out_dtype:
            y = y.to(self.out_dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.n)


def q8_0_blocks_exact(w: torch.Tensor) -> IntWeight | None:
    """`w` [N, K] (float) as Q8_0-style int8 codes with one fp16-exact scale per 32-block, when that
    reproduces every value exactly (true for a dequantized GGUF Q8_0 tensor: d = amax/127 recovers the
    stored fp16 d because the largest code is ±127), else None."""
    n, k = w.shape
    if k % BLOCK or not w.dtype.is_floating_point:
        return None
    wf = w.to(torch.float32).reshape(n, k // BLOCK, BLOCK)
    d = (wf.abs().amax(-1) / 127).to(torch.float16).to(torch.float32)       # [N, K/32]
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.round(wf / safe[..., None]).clamp(-127, 127)
    if not torch.equal(q * d[..., None], wf):
        return None
    return IntWeight(codes=q.to(torch.int8).reshape(n, k), scale=d, bits=8, group_size=BLOCK)
