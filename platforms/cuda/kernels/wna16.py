"""`TritonWNA16Kernel`: weight-only grouped-int GEMM (W4A16 / W8A16) for CUDA and ROCm.

Serves every format that becomes an `IntWeight` with bits 2..8: AWQ, GPTQ (act-order too), compressed-tensors
W4A16/W8A16, auto-round, torchao int4wo (float zero point), GGUF Q4_0/Q8_0 and, with their float offsets (mins),
Q4_1/Q5_1/K-quants: w = q * s + o is computed in the unpack of the GEMV, tensor-core and dequantize kernels
(`raw_offset`; the ring kernel adds o times each step's sum of x). With act-order they run on an integer zero
point plus (x summed per group) @ the residual offset (`_offset_split`; two small launches).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from quantrt.platforms.cuda.kernels._common import check_runtime, ring_device_why
from quantrt.quant.kernel import LinearKernel, LinearSpec
from quantrt.quant.pending import (
    ADD_RMS_NORM,
    GELU_MUL,
    NORM_PARTS,
    RESIDUAL_ADD,
    SILU_MUL,
    PendingNorm,
    PendingNormParts,
    PendingRows,
    SummedRows,
)
from quantrt.quant.weights import ActKind, IntWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

_MAGIC = float(2**23)  # (q | 0x4B000000) as fp32 == 2**23 + q
DEQUANT_MIN_M = 64  # from here (unless tc_wna16 runs): Triton dequantize to [K, N] + cuBLAS (8192², bs128: 114 vs 1146 us fused)
RING_MAX_M = 32     # up to here on Hopper: ring_wna16 (TMA word ring; H100 8192²: 16.3 us at M=1, 16.9-19.8 at 2-16,
                    # 26.6 at 32 vs 30.3 in tc_wna16; 4096x28672 M=32 36.0 vs 49.5)
RING_PRO_MAX_M = 1  # up to here the ring makes its input (add + RMSNorm, act * up) and adds the residual
                    # (`takes_pending`). H100 int4 e2e: batch 1 2.18 ms a step vs 2.24 launched; act * up at 2 rows
                    # 2.46 vs 2.43, and the norm's two whole rows in flight take 168 registers (K 4096) instead of 128
_RING_KINDS = (ADD_RMS_NORM, NORM_PARTS, SILU_MUL, GELU_MUL, RESIDUAL_ADD)
_RING_KINDS_OF = {"norm": (ADD_RMS_NORM,), "act": (SILU_MUL, GELU_MUL), "parts": (NORM_PARTS, RESIDUAL_ADD),
                  "norm+act": (ADD_RMS_NORM, SILU_MUL, GELU_MUL)}   # QUANTRT_CUDA_RING_PROLOGUE values (A/B)
SKINNY_MAX_M = 1    # up to here: the GEMV in skinny_wna16 (H100 8192²: 19.5 us at M=1; M=2 25.0 vs tc 26.1, M=4 38.8 vs 26.3)
# M = 2 off the ring (GGUF g32, per-channel, 8-bit, no Hopper): the GEMV where it measured faster than tc_wna16
# (H100, same call; 8-bit g32 8192² 35.4 vs 48.1 us, 14336x4096 34.2 vs 46.5, 4096² 12.9 vs 17.1; 4-bit g32
# 8192² 26.7 vs 33.7): N <= 8192, and K >= 8192 for 4-bit words (4096x28672 and 4-bit at K = 4096 lost)
SKINNY_M2_MAX_N = 8192
TC_MAX_M = 256      # SKINNY_MAX_M < M <= this, group % 128 == 0: tc_wna16 (tensor cores, BM-row tiles, 4/8-bit)
TC8_MAX_M = 128     # 8-bit container: above this dequantize + cuBLAS (8192², M=256: 128 vs 156 us in tc_wna16)



def _sorted_groups(w: IntWeight) -> tuple[torch.Tensor | None, bool]:
    """Act-order: (permutation sorting K by g_idx, whether the sorted groups are uniform)."""
    if w.g_idx is None:
        return None, True
    k = w.shape[1]
    g_idx = w.g_idx.long()
    perm = torch.argsort(g_idx, stable=True)
    want = torch.arange(k, device=g_idx.device) // w.group_size
    return perm, bool(torch.equal(g_idx[perm], want))


def compact_scale(scale: torch.Tensor) -> torch.Tensor:
    """fp32 scales -> fp16, else bf16, where that type holds every value exactly (a checkpoint's own 16-bit scales:
    half the scale bytes held and streamed, the same products), else unchanged."""
    for dt in (torch.float16, torch.bfloat16):
        s = scale.to(dt)
        if torch.equal(s.to(scale.dtype), scale):
            return s
    return scale


def pack_int_weight(w: IntWeight, container: int, perm: torch.Tensor | None, compact: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """IntWeight -> (packed [K/PACK, N] int32, scale [G, N] fp32, zero [G, N] fp32 + 2**23).

    Signed codes (int8 dtype) are shifted by 2**(bits-1) into 0..2**bits-1 with the same shift added
    to the zero point, so the kernel always computes (u - zero) * scale. `compact` (the linear kernels): the
    scales in 16 bits where exact (`compact_scale`); zero points as uint8 (the zero itself, no 2**23), or no zero
    array when every zero point is the one constant 2**(bits-1) (signed codes) or 0 (zero None: the kernels take
    it as `zero_const`). H100 int4 g128, one row: a step streams 8 KB of words and 0.25 KB of scales + 0.125 KB of
    zeros instead of 0.5 + 0.5 KB.
    """
    n, k = w.shape
    pack = 32 // container
    codes = w.codes.to(torch.int64)                                   # [N, K]
    bias = 1 << (w.bits - 1) if w.codes.dtype.is_signed else 0
    u = codes + bias
    if int(u.min()) < 0 or int(u.max()) >= (1 << w.bits):
        raise ValueError(f"codes out of range for {w.bits}-bit weights")
    if perm is not None:
        u = u[:, perm]
    shifts = torch.arange(pack, device=u.device, dtype=torch.int64) * container
    words = (u.reshape(n, k // pack, pack) << shifts).sum(-1)         # [N, K/PACK] in 0..2**32-1
    words = torch.where(words >= 2**31, words - 2**32, words)
    packed = words.to(torch.int32).t().contiguous()                   # [K/PACK, N]
    scale = w.scale.to(torch.float32).t().contiguous()                # [G, N]
    s = compact_scale(scale) if compact else scale
    if compact and w.zero is None:
        return packed, s, None
    if compact and 0 <= int(w.zero.min()) + bias and int(w.zero.max()) + bias <= 255:
        return packed, s, (w.zero.t().to(torch.int32) + bias).to(torch.uint8).contiguous()
    zero = torch.full_like(scale, float(bias)) if w.zero is None else w.zero.to(torch.float32).t() + bias
    return packed, s, (zero + _MAGIC).contiguous()


def _skinny_why(w: IntWeight, container: int) -> str:
    """'' when M <= SKINNY_MAX_M goes to the skinny GEMV, else why it stays on the tiled kernel."""
    pack = 32 // container
    if w.group_size < 2 * pack:
        return f"group size {w.group_size} is smaller than {2 * pack}"
    return ""


def _ring_why(w: IntWeight, container: int, device: torch.device) -> str:
    """'' when M <= RING_MAX_M goes to ring_wna16 (Gluon, sm_90 TMA + wgmma), else why it does not."""
    n, k = w.shape
    if container != 4:
        return f"{container}-bit container"
    if w.group_size % 128 or k % 128:
        return f"group size {w.group_size} / K={k} not a multiple of 128"
    if n % 32:
        return f"N={n} not a multiple of 32"
    return ring_device_why(device)


def _offset_split(w: IntWeight) -> tuple[IntWeight, torch.Tensor]:
    """Float offsets (GGUF Q4_1/Q5_1/K-quant mins, torchao's float zero point), w = q * s + o per group, as an
    integer zero point and a residual: z = round(-o / s) clamped to the code range, r = o + z * s (|r| <= s / 2
    inside it), so w = (q - z) * s + r. The kernels run the zero-point weight; y gets (x summed over each group)
    @ r, a small term, so rounding y before adding it costs no more than bf16 output rounding (a zero of 0 would
    leave y as the difference of two large terms). -> (weight with zero [N, G], r [N, G] fp32)."""
    s, o = w.scale.to(torch.float32), w.offset.to(torch.float32)
    z = torch.round(-o / s.clamp(min=torch.finfo(torch.float32).tiny)).clamp(0, (1 << w.bits) - 1)
    return IntWeight(w.codes, w.scale, w.bits, w.group_size, zero=z.to(torch.int32), g_idx=w.g_idx), o + z * s


class TritonWNA16Kernel(LinearKernel):
    """W4A16/W8A16: int codes dequantized in registers, fp16/bf16 activations, fp32 accumulation."""

    name = "triton_wna16"

    def __init__(self, spec: LinearSpec, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 container: int, perm: torch.Tensor | None, offset: torch.Tensor | None = None,
                 raw_offset: bool = False) -> None:
        w = spec.weight  # read here, not kept: the packed tensors replace the canonical ones
        self.shape, self.compute_dtype = w.shape, spec.compute_dtype    # (N, K)
        # zero: [G, N] uint8 z (or fp32 2**23 + z) when the checkpoint has zero points, the float offsets fp32
        # (raw_offset), or None when every zero point is `zero_const` (the compact form of `pack_int_weight`)
        self.packed, self.scale, self.zero = packed, scale, zero
        self.container = container
        self.perm = perm
        self.group = w.group_size
        self.zero_const = (1 << (w.bits - 1)) if w.codes.dtype.is_signed else 0
        # float offsets: the residual [G, N] fp32 of `_offset_split` (act-order sorts K by group, so the permuted x
        # visits the groups in this order too); or (raw_offset, no act-order) `zero` holds the offsets themselves,
        # w = q s + o, which the kernels apply in their unpack (the ring: o times each step's sum of x)
        self.offset = offset
        self.raw_offset = raw_offset
        self.skinny_why = _skinny_why(w, container)
        self.ring_why = _ring_why(w, container, packed.device)
        self._takes: dict[tuple, bool] = {}     # takes_pending's shape checks by (M, kind, tile override)

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        w = spec.weight
        if not isinstance(w, IntWeight):
            return False, f"weight is {type(w).__name__}, not IntWeight"
        if spec.act.kind is not ActKind.NONE:
            return False, f"activations are quantized ({spec.act}); this kernel is weight-only"
        n, k = w.shape
        pack = 32 // (4 if w.bits <= 4 else 8)
        if k % pack or w.group_size % pack:
            return False, f"K={k} and group size {w.group_size} must be multiples of {pack}"
        _, uniform = _sorted_groups(w)
        if not uniform:
            return False, "g_idx groups are not of uniform size after sorting"
        return check_runtime(w.codes, spec.compute_dtype)

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> TritonWNA16Kernel:
        w = spec.weight
        assert isinstance(w, IntWeight)
        container = 4 if w.bits <= 4 else 8
        perm, _ = _sorted_groups(w)
        offset = None
        if w.offset is not None and perm is None:   # float offsets in the unpack, w = q s + o': o' = o - bias * s
            packed, scale, zero = pack_int_weight(replace(w, offset=None), container, perm, compact=True)
            bias = (1 << (w.bits - 1)) if w.codes.dtype.is_signed else 0
            zero = (w.offset.to(torch.float32) - bias * w.scale.to(torch.float32)).t().contiguous()   # [G, N]
            return cls(spec, packed, scale, zero, container, perm, None, raw_offset=True)
        if w.offset is not None:   # float offsets: an integer zero point plus the residual per group
            w, r = _offset_split(w)
            offset = r.t().contiguous()                                       # [G, N] fp32
        packed, scale, zero = pack_int_weight(w, container, perm, compact=True)
        return cls(spec, packed, scale, zero, container, perm, offset)

    def _skinny_m2(self, k: int) -> bool:
        """Two rows take the GEMV (one FFMA per code and row) where it beat the tensor-core tiles (above)."""
        return self.shape[0] <= SKINNY_M2_MAX_N and (self.container == 8 or k >= 8192)

    def _tc_ok(self, m: int, k: int) -> bool:
        from quantrt.platforms.cuda.kernels.tc_wna16 import can_run

        return can_run(m, k, self.group, self.container) and (self.container == 4 or m <= TC8_MAX_M)

    def takes_pending(self, m: int, kind: str) -> bool:
        """Up to RING_PRO_MAX_M rows of add + RMSNorm (or RMSNorm from partial sums of squares) or act * mul are
        computed in the ring's activation load (`ring_prologue`), where the ring runs (Hopper, 4-bit, groups of
        128) and the layer has no act-order permutation or residual offsets; RESIDUAL_ADD (the residual added in
        the epilogue, leaving the next norm its partials) where the launch also splits K.
        QUANTRT_CUDA_RING_PROLOGUE "norm", "act", "parts" or "norm+act" takes only those kinds, "0" none (A/B)."""
        if not 1 <= m <= RING_PRO_MAX_M or kind not in _RING_KINDS:
            return False
        if self.ring_why or self.perm is not None or self.offset is not None:
            return False
        only = os.environ.get("QUANTRT_CUDA_RING_PROLOGUE", "1")
        if only == "0" or only != "1" and kind not in _RING_KINDS_OF.get(only, ()):
            return False
        key = (m, kind, os.environ.get("QUANTRT_CUDA_RING_TILES"))   # asked several times a layer and step
        if key not in self._takes:
            from quantrt.platforms.cuda.kernels.ring_wna16 import can_run, tagged_launch

            n, k = self.shape
            # the residual epilogue is the tagged split-K path's (one row, K split)
            self._takes[key] = ((kind != RESIDUAL_ADD or tagged_launch(m, n, k, self.packed.device))
                                and can_run(m, n, k, self.group, self.container, self.compute_dtype)[0])
        return self._takes[key]

    def apply_residual(self, x: torch.Tensor | PendingRows, residual: torch.Tensor) -> SummedRows:
        """residual + x @ W^T in the ring's epilogue, with its column tiles' sums of squares (`takes_pending`
        RESIDUAL_ADD said yes; x may be rows the ring makes itself)."""
        from quantrt.platforms.cuda.kernels.ring_wna16 import ring_wna16

        src, pro = (self._source(x) if isinstance(x, PendingRows)
                    else (x.reshape(-1, self.shape[1]).to(self.compute_dtype), None))
        s, parts = ring_wna16(src, self.packed, self.scale, self.zero, self.group, zero_const=self.zero_const,
                              offset=self.raw_offset, pro=pro, residual=residual)
        return SummedRows(s, parts)

    def _source(self, x: PendingRows) -> tuple:
        """(the ring's x, its RingPrologue) for rows it makes itself."""
        from quantrt.platforms.cuda.kernels.ring_prologue import (
            PRO_GELU,
            PRO_NORM,
            PRO_NORM_PARTS,
            PRO_SILU,
            RingPrologue,
        )

        if isinstance(x, PendingNorm):
            return x.x, RingPrologue(PRO_NORM, x.delta, x.weight, x.residual, x.eps)
        if isinstance(x, PendingNormParts):
            return x.s, RingPrologue(PRO_NORM_PARTS, weight=x.weight, eps=x.eps, parts=x.parts)
        return x.gu, RingPrologue(PRO_GELU if x.gelu else PRO_SILU)

    def _apply_pending(self, x: PendingRows, bias: torch.Tensor | None) -> torch.Tensor:
        """The ring over rows it makes itself (`takes_pending`); rows it does not take are materialized first."""
        if not self.takes_pending(x.shape[0], x.kind):
            return self.apply(x.materialize(), bias)
        from quantrt.platforms.cuda.kernels.ring_wna16 import ring_wna16

        src, pro = self._source(x)
        y = ring_wna16(src, self.packed, self.scale, self.zero, self.group, zero_const=self.zero_const,
                       offset=self.raw_offset, pro=pro, release_early=self.release_early)
        return self._finish(src, y, bias, x.shape[:-1])

    def apply(self, x: torch.Tensor | PendingRows, bias: torch.Tensor | None) -> torch.Tensor:
        from quantrt.platforms.cuda.kernels.wna16_triton import wna16_dequantize, wna16_matmul

        if isinstance(x, PendingRows):
            return self._apply_pending(x, bias)
        k = self.shape[1]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k).to(self.compute_dtype)                         # [M, K]
        if self.perm is not None:
            x2 = x2[:, self.perm]
        if x2.shape[0] <= RING_MAX_M and not self.ring_why:
            from quantrt.platforms.cuda.kernels.ring_wna16 import ring_wna16

            y = ring_wna16(x2, self.packed, self.scale, self.zero, self.group, zero_const=self.zero_const,
                           offset=self.raw_offset, release_early=self.release_early)
        elif (x2.shape[0] <= SKINNY_MAX_M or x2.shape[0] == 2 and self._skinny_m2(k)) and not self.skinny_why:
            from quantrt.platforms.cuda.kernels.skinny_wna16 import skinny_wna16

            y = skinny_wna16(x2, self.packed, self.scale, self.zero, self.group, self.container,
                             zero_const=self.zero_const, offset=self.raw_offset)
        elif x2.shape[0] <= TC_MAX_M and self._tc_ok(x2.shape[0], k):
            from quantrt.platforms.cuda.kernels.tc_wna16 import tc_wna16

            y = tc_wna16(x2, self.packed, self.scale, self.zero, self.group, bits=self.container,
                         offset=self.raw_offset, zero_const=self.zero_const)
        elif x2.shape[0] >= DEQUANT_MIN_M:
            w = wna16_dequantize(self.packed, self.scale, self.zero, self.group, self.container, x2.dtype,
                                 offset=self.raw_offset, zero_const=self.zero_const)
            y = torch.nn.functional.linear(x2, w.t())                          # w: [K, N] -> [M, N]
        else:
            y = wna16_matmul(x2, self.packed, self.scale, self.zero, self.group, self.container,
                             offset=self.raw_offset, zero_const=self.zero_const)
        return self._finish(x2, y, bias, lead)

    def _finish(self, x2: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, lead: torch.Size
                ) -> torch.Tensor:
        """y [M, N] from the kernel -> + the residual-offset term (split float offsets), + bias, [..., N]."""
        if self.offset is not None:  # float offsets: group sums of x [M, G] @ the residual offsets [G, N], fp32
            corr = x2.reshape(x2.shape[0], -1, self.group).sum(-1, dtype=torch.float32) @ self.offset
            y = (y + corr).to(y.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, self.shape[0])
