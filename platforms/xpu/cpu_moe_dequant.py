"""Per-expert dequantization into reused, cache-sized buffers: the CPU MoE path for fp32 math on
quantized experts (int 2..8 bits, fp8 e4m3/e5m2 with tensor/channel/block scales, MXFP4).

Each projection's experts are kept compact (`*Mats`: packed int4 / int8 / fp8 bytes / packed fp4 + e8m0
bytes) and `mm(x, e)` computes x @ w_e^T tile by tile: a tile of at most TILE_BYTES of fp32 weight rows is
dequantized into a buffer allocated once at prepare (no page-faulting temporaries, cache-resident), then
one BLAS mm writes those output columns. Scales that are constant along K (per channel / per tensor) and
integer zero points are applied to the output instead of the weights (y = s * (x @ u^T) + xg @ b^T), so
the dequantization is a few vectorized integer/convert passes:

- int codes: two per byte for bits <= 4 (low nibble = first half of each group, high nibble = second
  half), uint8->fp32 conversion, per-group scale multiply (groups < K only). Act-order (g_idx) experts
  are stored with their columns sorted by group; groups of <= 32 are dequantized as two contiguous tile
  halves (all low nibbles, then all high ones); x is permuted per call to the tile's order (`Mats.perm`).
- fp8: torch's fp8->fp32 conversion is scalar (~40x slower than uint8->fp32 here), so the bytes are
  turned into fp16 bit patterns with two int16 ops (e4m3: sign-extend, << 7, clear bit 14; e5m2: << 8,
  it is the top half of fp16), converted by the vectorized fp16->fp32 path and the power of two this
  leaves (2^8 for e4m3) is folded into the scale. NaN bytes are not preserved (weights have none).
- MXFP4 (cpu_moe_mxfp4): the same fp16 trick on e2m1 nibbles (factor 2^14), e8m0 scale bytes decoded
  per tile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantrt.platforms.xpu.cpu_moe_sorted import SortedMoE, base_checks, same, same_int
from quantrt.quant.moe_kernel import MoESpec
from quantrt.quant.quantize import FP8_DTYPES, fake_quantize_act
from quantrt.quant.weights import ActKind, FloatWeight, IntWeight, ScaleGranularity

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

TILE_BYTES = 4 << 20   # fp32 weight rows dequantized at once (the reused buffer's size)
HALVES_MAX_GROUP = 32  # packed int groups up to this size are written as tile halves (IntMats.halves)

_SCRATCH: dict[str, torch.Tensor] = {}   # name -> bytes; one set for all MoE layers (they run one at a time)


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer of `shape` / `dtype` (contents undefined), shared by every Mats of the process:
    allocated once at the largest size asked for (prepare asks first), so calls do not page-fault."""
    n = dtype.itemsize
    for d in shape:
        n *= d
    t = _SCRATCH.get(name)
    if t is None or t.numel() < n:
        t = _SCRATCH[name] = torch.empty(n, dtype=torch.uint8)
    return t[:n].view(dtype).view(shape)


class Mats:
    """One projection of all experts (gate+up fused, or down): E weights [N, K] kept compact, split into
    `parts` along N (gate, up) that may each carry a column permutation (act-order)."""

    def __init__(self, n: int, k: int, part_rows: list[int], tile_bytes: int | None, align: int = 1):
        self.n, self.k = n, k
        rows = max(align, (tile_bytes or TILE_BYTES) // (4 * k) // align * align)
        self.tiles: list[tuple[int, int, int]] = []                   # (n0, n1, part)
        p0 = 0
        for p, pr in enumerate(part_rows):
            self.tiles += [(n0, min(n0 + rows, p0 + pr), p) for n0 in range(p0, p0 + pr, rows)]
            p0 += pr
        self.rows = max(n1 - n0 for n0, n1, _ in self.tiles)
        self.scratch(torch.float32)                                     # reserve the shared buffer now
        self.perm: torch.Tensor | None = None                          # [E, P, K] column order or None

    def scratch(self, dtype: torch.dtype, k: int | None = None) -> torch.Tensor:
        """The shared buffer of `dtype` for one tile: [rows, k or K]."""
        return scratch(str(dtype), (self.rows, k or self.k), dtype)

    def dequant(self, e: int, n0: int, n1: int) -> torch.Tensor:
        """Rows n0:n1 of expert e's weight (stored column order), without the output-side scale: an fp32
        view into the shared scratch buffer."""
        raise NotImplementedError

    def finish(self, yt: torch.Tensor, x: torch.Tensor, e: int, n0: int, n1: int) -> None:
        """Apply the output-side scale / zero-point term to yt [n1-n0, m] (= w_tile @ x^T), in place."""

    def mm(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x: [m, K] fp32 -> x @ w_e^T [m, N] fp32 (a transposed view)."""
        yt = torch.empty(self.n, x.shape[0], dtype=torch.float32)
        xp, last = x, -1
        for n0, n1, p in self.tiles:
            if self.perm is not None and p != last:
                xp, last = x[:, self.perm[e, p]], p
            torch.mm(self.dequant(e, n0, n1), xp.t(), out=yt[n0:n1])
            self.finish(yt[n0:n1], xp, e, n0, n1)
        return yt.t()


def _group_order(g_idx: torch.Tensor, group: int) -> torch.Tensor | None:
    """Columns sorted by group (stable) when every group holds exactly `group` columns, else None."""
    k = g_idx.numel()
    if not torch.equal(torch.bincount(g_idx.long(), minlength=k // group), torch.full((k // group,), group)):
        return None
    return g_idx.long().argsort(stable=True)


def act_order_ok(parts: list[IntWeight]) -> bool:
    return all(w.g_idx is None or _group_order(w.g_idx, w.group_size) is not None for w in parts)


class IntMats(Mats):
    """IntWeights: w = u * s + b per group, u unsigned codes (signed codes + 2^(bits-1), b = -that * s,
    minus zero * s, plus offset). Two codes per byte when bits <= 4 and the group size is even."""

    def __init__(self, parts: list[list[IntWeight]], tile_bytes: int | None = None,
                 scale_dtype: torch.dtype = torch.float32):
        w0 = parts[0][0]
        n, k = sum(w.shape[0] for w in parts[0]), w0.shape[1]
        super().__init__(n, k, [w.shape[0] for w in parts[0]], tile_bytes)
        self.gs, self.g = w0.group_size, k // w0.group_size
        signed = w0.codes.dtype == torch.int8
        off = 1 << (w0.bits - 1) if signed and w0.bits <= 4 else 0   # 5..8-bit signed codes stay int8
        if w0.g_idx is not None:
            self.perm = torch.stack([torch.stack([_group_order(w.g_idx, w.group_size) for w in p]) for p in parts])

        def codes(e: int) -> torch.Tensor:
            cs = [w.codes if self.perm is None else w.codes[:, self.perm[e, i]] for i, w in enumerate(parts[e])]
            return torch.cat(cs).to(torch.int16).add_(off).to(torch.int8 if signed and not off else torch.uint8)

        self.packed = w0.bits <= 4 and self.gs % 2 == 0
        # small groups: a tile holds all low nibbles, then all high ones (contiguous writes; x permuted to
        # match); from 64 codes per half the strided writes cost less than the wider scale broadcast
        self.halves = self.packed and 1 < self.g and self.gs <= HALVES_MAX_GROUP
        cs = torch.stack([codes(e) for e in range(len(parts))])                                # [E, N, K]
        if self.packed:   # byte j of a group: first-half code j (low nibble), second-half code j (high)
            c = cs.view(len(parts), n, self.g, 2, self.gs // 2)
            cs = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).reshape(len(parts), n, k // 2)          # [E, N, K/2]
            self.scratch(torch.uint8, k // 2)
        if self.halves:
            half = torch.arange(k).view(self.g, 2, self.gs // 2).transpose(0, 1).flatten()
            self.perm = (half.expand(len(parts), len(parts[0]), k) if self.perm is None
                         else self.perm.gather(2, half.expand_as(self.perm)))
        self.codes = cs.contiguous()

        def stack(attr: str) -> torch.Tensor:
            return torch.stack([torch.cat([getattr(w, attr).to(torch.float32) for w in p]) for p in parts])

        s = stack("scale")                                                                      # [E, N, G]
        b = -off * s if off else None
        if w0.zero is not None:
            b = -stack("zero") * s if b is None else b - stack("zero") * s
        if w0.offset is not None:
            b = stack("offset") if b is None else b + stack("offset")
        self.s, self.b = s.to(scale_dtype).contiguous(), None if b is None else b.contiguous()

    def dequant(self, e: int, n0: int, n1: int) -> torch.Tensor:
        r, w = n1 - n0, self.scratch(torch.float32)[: n1 - n0]
        c = self.codes[e, n0:n1]
        if self.halves:
            t, half = self.scratch(torch.uint8, self.k // 2)[:r], self.k // 2
            w[:, :half].copy_(torch.bitwise_and(c, 15, out=t))
            w[:, half:].copy_(torch.bitwise_right_shift(c, 4, out=t))
            w.view(r, 2, self.g, self.gs // 2).mul_(self.s[e, n0:n1, None, :, None])
            return w
        if self.packed:
            t = self.scratch(torch.uint8, self.k // 2)[:r].view(r, self.g, -1)
            wv, cv = w.view(r, self.g, 2, self.gs // 2), c.view(r, self.g, -1)
            wv[:, :, 0].copy_(torch.bitwise_and(cv, 15, out=t))
            wv[:, :, 1].copy_(torch.bitwise_right_shift(cv, 4, out=t))
        else:
            w.copy_(c)
        if self.g > 1:
            w.view(r, self.g, self.gs).mul_(self.s[e, n0:n1, :, None])
        return w

    def finish(self, yt: torch.Tensor, x: torch.Tensor, e: int, n0: int, n1: int) -> None:
        if self.g == 1:
            yt.mul_(self.s[e, n0:n1])
        if self.b is not None:                                             # + b [r, G] @ group sums of x
            xg = (x.view(x.shape[0], 2, self.g, self.gs // 2).sum((1, 3)) if self.halves
                  else x.view(x.shape[0], self.g, self.gs).sum(-1))                             # [m, G]
            yt.addmm_(self.b[e, n0:n1], xg.t())


FP8_FACTOR = {torch.float8_e4m3fn: 2.0 ** 8, torch.float8_e5m2: 1.0}   # fp8 value / its fp16-bits value


class Fp8Mats(Mats):
    """fp8 FloatWeights (e4m3fn / e5m2): bytes kept as int8 [E, N, K]; scales: per output row [E, N] (tensor,
    channel: applied to the output) or per block, expanded along K ([E, nb, K], applied to the tile)."""

    def __init__(self, ws: list[list[FloatWeight]], tile_bytes: int | None = None):
        w0 = ws[0][0]
        n, k = sum(w.shape[0] for w in ws[0]), w0.shape[1]
        self.block = w0.block if w0.granularity is ScaleGranularity.BLOCK else None
        super().__init__(n, k, [n], tile_bytes, align=self.block[0] if self.block else 1)
        self.e4m3 = w0.data.dtype == torch.float8_e4m3fn
        f = FP8_FACTOR[w0.data.dtype]
        self.data = torch.stack([torch.cat([w.data.view(torch.int8) for w in p]) for p in ws]).contiguous()
        self.scratch(torch.int16)
        if self.block is None:
            self.s = torch.stack([torch.cat([w.scale.to(torch.float32).expand(w.shape[0]) for w in p])
                                  for p in ws]) * f                                             # [E, N]
        else:
            bn, bk = self.block
            self.s = torch.stack([torch.cat([w.scale.to(torch.float32) for w in p]).repeat_interleave(bk, 1)[:, :k]
                                  for p in ws]) * f                                             # [E, nb, K]

    def dequant(self, e: int, n0: int, n1: int) -> torch.Tensor:
        r, w, h = n1 - n0, self.scratch(torch.float32)[: n1 - n0], self.scratch(torch.int16)[: n1 - n0]
        h.copy_(self.data[e, n0:n1])                                  # sign-extended bytes
        if self.e4m3:
            h.bitwise_left_shift_(7).bitwise_and_(-16385)             # s eeee mmm -> fp16 s0eeeemmm0000000
        else:
            h.bitwise_left_shift_(8)                                  # e5m2 = the top byte of fp16
        w.copy_(h.view(torch.float16))
        if self.block is not None:
            bn = self.block[0]
            b0, full = n0 // bn, r // bn
            if full:
                w[: full * bn].view(full, bn, self.k).mul_(self.s[e, b0:b0 + full, None])
            if r % bn:
                w[full * bn:].mul_(self.s[e, b0 + full])
        return w

    def finish(self, yt: torch.Tensor, x: torch.Tensor, e: int, n0: int, n1: int) -> None:
        if self.block is None:
            yt.mul_(self.s[e, n0:n1, None])


# -- the kernel ---------------------------------------------------------------------------------------------
class CpuMoEDequantKernel(SortedMoE):
    """Every IntWeight (2..8 bits, groups, zero/offset, act-order with equal-size groups) and fp8 e4m3fn/e5m2
    FloatWeight (tensor / channel / block scales), weight-only or with int8/fp8 activations (fake-quantized
    per expert exactly like the reference kernel), any compute dtype (math in fp32): per active expert
    `Mats.mm` for gate+up and for down."""

    name = "cpu_moe_dequant"

    def __init__(self, spec: MoESpec, w13: Mats, w2: Mats):
        super().__init__(spec)
        self.w13, self.w2 = w13, w2

    @classmethod
    def can_implement(cls, spec: MoESpec, platform: Platform) -> tuple[bool, str]:
        w0 = spec.experts[0][0]
        if isinstance(w0, IntWeight):
            why = base_checks(spec, IntWeight)
            if not why and not same_int(spec):
                why = "experts differ in bits/group/zero layout"
            if not why and not all(act_order_ok(list(ex)) for ex in spec.experts):
                why = "act-order (g_idx) groups of unequal size"
        elif isinstance(w0, FloatWeight):
            why = base_checks(spec, FloatWeight)
            if not why and w0.data.dtype not in FP8_FACTOR:
                why = f"weight dtype {w0.data.dtype} is not float8_e4m3fn/float8_e5m2"
            if not why and not same(spec, lambda w: (w.data.dtype, w.granularity, w.block)):
                why = "experts differ in fp8 dtype or scale granularity"
            if not why and w0.block is not None and spec.inter % w0.block[0]:
                why = f"intermediate size {spec.inter} is not a multiple of the {w0.block[0]}-row scale block"
        else:
            why = f"experts are {'/'.join(sorted(spec.schemes()))} (serves int and fp8)"
        if not why:
            a = spec.acts[0][0]
            if a.kind is not ActKind.NONE and a.dtype not in (torch.int8, *FP8_DTYPES):
                why = f"activation dtype {a.dtype} (serves int8/fp8 activations or weight-only)"
        return (not why), why

    @classmethod
    def prepare(cls, spec: MoESpec, platform: Platform) -> CpuMoEDequantKernel:
        mats = IntMats if isinstance(spec.experts[0][0], IntWeight) else Fp8Mats
        return cls(spec, mats([[g, u] for g, u, _ in spec.experts]), mats([[d] for _, _, d in spec.experts]))

    def _rows(self, xs: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = torch.empty(xs.shape, dtype=torch.float32)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                x = fake_quantize_act(xs[start:start + c], self.acts13[e])                    # [c, H] fp32
                h = fake_quantize_act(self._act(self.w13.mm(x, e), e), self.acts2[e])        # [c, I] fp32
                out[start:start + c] = self.w2.mm(h, e)
                start += c
        return out
