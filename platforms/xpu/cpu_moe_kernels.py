"""CPU MoE kernels for quantized experts, in preference order (`CPU_MOE_KERNELS`).

All three sort the T*k (token, expert) pairs by expert once (`grouped_layout`), run the experts on
contiguous row segments, scale by the routing weights and index_add back: no per-token Python work.
Weights stay quantized in memory (packed int4, int8, fp8); nothing is dequantized once at prepare.

- `CpuMoEInt4PackedKernel`: int (bits <= 4, groups that are multiples of 32; AWQ/GPTQ/compressed-tensors
  W4A16 = moe_wna16, GGUF Q4_0/Q4_1) with bf16/fp16 compute: per active expert two calls of torch's packed
  int4 CPU GEMM (`_weight_int4pack_mm_for_cpu`, gate+up fused). fp32 compute is refused for the same
  reason as the linear kernel (the op rounds activations to bf16).
- `CpuMoEInt8PackedKernel`: symmetric per-channel int8 with int8 per-token dynamic activations (W8A8
  int8 / YAML int8_w8a8), or weight-only in bf16/fp16: per active expert `_weight_int8pack_mm`; for W8A8
  the int8 activation codes go in as fp32 (exact integers, fp32 weight scales, fp32 output) and their
  row scales multiply the output, so W8A8 equals the reference up to summation order; weight-only runs
  the op's fast bf16 flavour. An expert with more than PACK_MAX_ROWS rows is dequantized for that call
  (the op is slow at many rows); the weights stay int8 in memory.
- `CpuMoEGatherDequantKernel`: every IntWeight and fp8 FloatWeight (tensor / channel / block scales),
  weight-only or with fp8/int8 activations: gathers only the active experts' packed codes, dequantizes
  them in one batched op per projection (int <= 4 bits kept two codes per byte), activations fake-quantized
  exactly like the reference, one fp32 `torch._grouped_mm` per projection. Experts are processed in chunks
  so that the dequantized temporary stays under DEQUANT_BUDGET_BYTES.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from quantrt.layers.moe.experts import fake_quant_rows, grouped_layout, uniform_acts
from quantrt.quant.moe_kernel import MoEKernel, MoESpec, expert_activation
from quantrt.quant.quantize import FP8_DTYPES, quantize_act_per_token
from quantrt.quant.weights import ActKind, FloatWeight, IntWeight, ScaleGranularity

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

PACK_MAX_ROWS = 16                 # rows of one expert above which the int8 op's fp32/bf16 path is slower
#                                    than dequantizing that expert for the call (cpu_kernels.INT8PACK_MAX_M)
DEQUANT_BUDGET_BYTES = 256 << 20   # fp32 dequantized experts held at once by the gather kernel
INT4_GROUPS = (256, 128, 64, 32)
_COMPUTE = (torch.float32, torch.bfloat16, torch.float16)


def _base_checks(spec: MoESpec, kind: type) -> str:
    if spec.compute_dtype not in _COMPUTE:
        return f"compute dtype {spec.compute_dtype} is not float32/bfloat16/float16"
    ws = [w for ex in spec.experts for w in ex]
    if not all(isinstance(w, kind) for w in ws):
        return f"experts are {'/'.join(sorted(spec.schemes()))}, not all {kind.__name__}"
    t = ws[0].codes if kind is IntWeight else ws[0].data
    if t.device.type != "cpu":
        return f"experts are on {t.device.type}, not cpu"
    return uniform_acts(spec)


def _same(spec: MoESpec, key) -> bool:
    return len({key(w) for ex in spec.experts for w in ex}) == 1


def _int_layout(w: IntWeight) -> tuple:
    return (w.bits, w.codes.dtype, w.zero is not None, w.offset is not None, w.g_idx is not None)


def _same_int(spec: MoESpec) -> bool:
    """One int layout for all experts, one group size for gate/up (K = H) and one for down (K = I)."""
    return (_same(spec, _int_layout) and len({w.group_size for ex in spec.experts for w in ex[:2]}) == 1
            and len({ex[2].group_size for ex in spec.experts}) == 1)


def _gidx_mismatch(g: IntWeight, u: IntWeight) -> bool:
    return g.g_idx is not None and not torch.equal(g.g_idx, u.g_idx)


def _cat_int(a: IntWeight, b: IntWeight) -> IntWeight:
    """gate [I, H] and up [I, H] -> one IntWeight [2I, H] (same layout and act-order, checked by the caller)."""
    def cat(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None or y is None else torch.cat([x, y])

    return IntWeight(torch.cat([a.codes, b.codes]), torch.cat([a.scale, b.scale]), a.bits, a.group_size,
                     cat(a.zero, b.zero), cat(a.offset, b.offset), a.g_idx)


class _SortedMoE(MoEKernel):
    """Shared apply: sort pairs by expert, `_rows` computes the sorted rows, weight, scatter back.
    Expert biases (fp32, b13 [E, 2I] gate then up, b2 [E, H]) and the activation (silu or clamped SwiGLU)
    come from the spec: `_act` adds the gate/up bias and applies it, `apply` adds the down bias."""

    def __init__(self, spec: MoESpec):
        self.num_experts, self.compute_dtype = spec.num_experts, spec.compute_dtype  # not the canonical experts
        self.acts13 = [a[0] for a in spec.acts]
        self.acts2 = [a[2] for a in spec.acts]
        self.activation = spec.activation
        self.b13, self.b2 = spec.biases(torch.device("cpu"))

    def _act(self, gu: torch.Tensor, rows: int | torch.Tensor) -> torch.Tensor:
        """gu: [m, 2I] gate then up of rows of expert `rows` (an int) or of experts rows [m] -> [m, I] fp32."""
        gu = gu.float()
        if self.b13 is not None:
            gu = gu + (self.b13[rows] if isinstance(rows, int) else self.b13[rows])
        g, u = gu.chunk(2, dim=-1)
        return expert_activation(self.activation, g, u)

    def _rows(self, xs: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs: [M, H] rows sorted by expert; seg: [M] their expert; counts: [E] -> [M, H] fp32."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        order, tok, seg, counts = grouped_layout(ids, self.num_experts)
        y = self._rows(x[tok], seg, counts)                                    # [T*k, H] fp32
        if self.b2 is not None:
            y = y + self.b2[seg]
        y = y * weights.flatten()[order, None].to(torch.float32)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tok, y)
        return out.to(self.compute_dtype)


# -- per active expert: torch's packed int4 / int8 CPU GEMMs -----------------------------------------------
class CpuMoEInt4PackedKernel(_SortedMoE):
    name = "cpu_moe_int4_packed"

    def __init__(self, spec: MoESpec, w13: list, w2: list):
        super().__init__(spec)
        self.w13, self.w2 = w13, w2                       # per expert a prepared CpuInt4PackedKernel

    @classmethod
    def can_implement(cls, spec: MoESpec, platform: Platform) -> tuple[bool, str]:
        from quantrt.platforms.xpu.cpu_int_kernels import CpuInt4PackedKernel
        from quantrt.quant.kernel import LinearSpec

        why = _base_checks(spec, IntWeight)
        if why:
            return False, why
        if spec.compute_dtype == torch.float32:
            return False, "compute dtype float32: the int4 op rounds activations to bf16 (use --dtype bfloat16)"
        if spec.act_schemes() != {"a16"}:
            return False, f"activations are quantized ({'/'.join(sorted(spec.act_schemes()))}); weight-only kernel"
        for p, w in enumerate(spec.experts[0]):
            ok, r = CpuInt4PackedKernel.can_implement(LinearSpec(w, spec.acts[0][p], spec.compute_dtype), platform)
            if not ok:
                return False, r
        if not _same_int(spec):
            return False, "experts differ in bits/group/zero layout"
        return True, ""

    @classmethod
    def prepare(cls, spec: MoESpec, platform: Platform) -> CpuMoEInt4PackedKernel:
        from quantrt.platforms.xpu.cpu_int_kernels import CpuInt4PackedKernel
        from quantrt.quant.kernel import LinearSpec

        def prep(w, act):
            return CpuInt4PackedKernel.prepare(LinearSpec(w, act, spec.compute_dtype), platform)

        # gate+up fused into one call unless their act-order permutations differ
        w13 = [[prep(g, a[0]), prep(u, a[1])] if _gidx_mismatch(g, u) else [prep(_cat_int(g, u), a[0])]
               for (g, u, _), a in zip(spec.experts, spec.acts)]
        w2 = [prep(d, a[2]) for (_, _, d), a in zip(spec.experts, spec.acts)]
        return cls(spec, w13, w2)

    def _rows(self, xs: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = torch.empty(xs.shape, dtype=torch.float32, device=xs.device)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                x = xs[start:start + c]
                h = self._act(torch.cat([k.apply(x, None) for k in self.w13[e]], -1), e)       # [c, I]
                out[start:start + c] = self.w2[e].apply(h.to(x.dtype), None)
                start += c
        return out


class CpuMoEInt8PackedKernel(_SortedMoE):
    name = "cpu_moe_int8_packed"

    def __init__(self, spec: MoESpec, w13: list, w2: list):
        super().__init__(spec)
        self.w13, self.w2 = w13, w2                       # per expert (codes [N, K] int8, scale [N])
        self.quant_act = self.acts13[0].kind is ActKind.DYNAMIC_TOKEN

    @classmethod
    def can_implement(cls, spec: MoESpec, platform: Platform) -> tuple[bool, str]:
        why = _base_checks(spec, IntWeight)
        if why:
            return False, why
        w = spec.experts[0][0]
        if (not _same_int(spec) or w.bits != 8 or w.codes.dtype != torch.int8
                or any(x.group_size != x.shape[1] for ex in spec.experts for x in ex)):
            return False, f"needs symmetric per-channel int8 codes (experts are {'/'.join(sorted(spec.schemes()))})"
        if w.zero is not None or w.offset is not None or w.g_idx is not None:
            return False, "needs symmetric int8 without zero point or act-order"
        a = spec.acts[0][0]
        if a.kind is ActKind.DYNAMIC_TOKEN and a.dtype == torch.int8:
            return True, ""
        if a.kind is not ActKind.NONE:
            return False, f"activations {a} (serves int8 per-token dynamic or weight-only)"
        if spec.compute_dtype == torch.float32:
            return False, "weight-only in float32: the op rounds activations to bf16 (use --dtype bfloat16)"
        return True, ""

    @classmethod
    def prepare(cls, spec: MoESpec, platform: Platform) -> CpuMoEInt8PackedKernel:
        a = spec.acts[0][0]
        sdt = torch.float32 if a.kind is ActKind.DYNAMIC_TOKEN else torch.bfloat16   # the op's x dtype

        def pack(*ws):
            return (torch.cat([w.codes for w in ws]).contiguous(),
                    torch.cat([w.scale.reshape(-1) for w in ws]).to(sdt).contiguous())

        return cls(spec, [pack(g, u) for g, u, _ in spec.experts], [pack(d) for _, _, d in spec.experts])

    def _mm(self, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        codes, scale = w
        if not self.quant_act:
            x = x.to(torch.bfloat16).contiguous()
            if x.shape[0] > PACK_MAX_ROWS:    # many rows: this expert dequantized for this call only
                return F.linear(x, codes.to(torch.bfloat16) * scale[:, None]).float()
            return torch.ops.aten._weight_int8pack_mm(x, codes, scale).float()
        q, s = quantize_act_per_token(x, torch.int8)                           # [c, K] int8, [c, 1]
        if q.shape[0] > PACK_MAX_ROWS:
            return F.linear(q.to(torch.float32), codes.to(torch.float32) * scale[:, None]) * s
        return torch.ops.aten._weight_int8pack_mm(q.to(torch.float32), codes, scale) * s

    def _rows(self, xs: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = torch.empty(xs.shape, dtype=torch.float32, device=xs.device)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                h = self._act(self._mm(xs[start:start + c], self.w13[e]), e)          # [c, I]
                out[start:start + c] = self._mm(h, self.w2[e])
                start += c
        return out


# -- gather the active experts, dequantize in one batched op, grouped GEMM ---------------------------------
class _IntStack:
    """E experts' IntWeights [N, K] stacked transposed, as torch._grouped_mm takes B ([E, K, N]):
    w = u * s + b per group, u unsigned (two codes per byte along K when bits <= 4).
    parts: per expert the IntWeights concatenated along N (gate, up) or one (down); each part keeps its
    own act-order g_idx."""

    def __init__(self, parts: list[list[IntWeight]]):
        w0 = parts[0][0]
        ws = [torch.cat([w.codes for w in p]) for p in parts]
        self.n, self.k = ws[0].shape
        self.gs, self.p = w0.group_size, len(parts[0])
        off = 1 << (w0.bits - 1) if w0.codes.dtype == torch.int8 else 0
        u = torch.stack([(c.t().to(torch.int16) + off).to(torch.uint8) for c in ws])          # [E, K, N]
        self.packed = w0.bits <= 4 and self.k % 2 == 0
        self.codes = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous() if self.packed else u     # [E, K/2, N]

        def stack(attr: str) -> torch.Tensor:
            return torch.stack([torch.cat([getattr(w, attr).to(torch.float32) for w in p]).t() for p in parts])

        s = stack("scale")                                                                   # [E, G, N]
        b = -off * s
        if w0.zero is not None:
            b = b - stack("zero") * s
        if w0.offset is not None:
            b = b + stack("offset")
        self.s, self.b = s.contiguous(), b.contiguous()
        self.g_idx = (torch.stack([torch.stack([w.g_idx.long() for w in p]) for p in parts])
                      if w0.g_idx is not None else None)                                     # [E, P, K]

    def dequant(self, act: torch.Tensor) -> torch.Tensor:
        """act: [A] expert ids -> [A, K, N] fp32."""
        c = self.codes[act]
        a = c.shape[0]
        if self.packed:
            c = torch.stack([c & 15, c >> 4], dim=2).view(a, self.k, self.n)                # [A, K, N]
        s, b = self.s[act], self.b[act]                                                      # [A, G, N]
        if self.g_idx is not None:
            idx = self.g_idx[act].transpose(1, 2)[..., None].expand(a, self.k, self.p, self.n // self.p)
            idx = idx.reshape(a, self.k, self.n)                                             # [A, K, N]
            return torch.addcmul(b.gather(1, idx), c.to(torch.float32), s.gather(1, idx))
        g = self.k // self.gs
        c = c.view(a, g, self.gs, self.n).to(torch.float32)
        return torch.addcmul(b[:, :, None], c, s[:, :, None]).view(a, self.k, self.n)


class _Fp8Stack:
    """E FloatWeights [N, K] fp8 stacked transposed ([E, K, N]); scales as rows [E, N] (tensor/channel)
    or blocks [E, kb, nb]."""

    def __init__(self, ws: list[FloatWeight]):
        w0 = ws[0]
        self.n, self.k = w0.shape
        self.data = torch.stack([w.data.t() for w in ws]).contiguous()                        # [E, K, N] fp8
        self.block = w0.block
        if w0.granularity is ScaleGranularity.BLOCK:
            self.s = torch.stack([w.scale.to(torch.float32).t() for w in ws]).contiguous()     # [E, kb, nb]
        else:
            self.s = torch.stack([w.scale.to(torch.float32).expand(self.n) if w.scale.dim() == 0
                                  else w.scale.to(torch.float32) for w in ws])               # [E, N]

    def dequant(self, act: torch.Tensor) -> torch.Tensor:
        """act: [A] expert ids -> [A, K, N] fp32."""
        w = self.data[act].to(torch.float32)                                                 # [A, K, N]
        s = self.s[act]
        if self.block is None:
            return w.mul_(s[:, None, :])
        bn, bk = self.block
        a, kb, nb = s.shape
        if self.n == nb * bn and self.k == kb * bk:
            return w.view(a, kb, bk, nb, bn).mul_(s[:, :, None, :, None]).view(a, self.k, self.n)
        return w.mul_(s.repeat_interleave(bk, 1)[:, : self.k].repeat_interleave(bn, 2)[:, :, : self.n])


def _cat_float(a: FloatWeight, b: FloatWeight) -> FloatWeight:
    """gate and up -> [2I, H]; tensor scales become channel scales, block scales stack (I % bn == 0)."""
    if a.granularity is ScaleGranularity.BLOCK:
        return FloatWeight(torch.cat([a.data, b.data]), torch.cat([a.scale, b.scale]), a.granularity, a.block)
    rows = [w.scale.to(torch.float32).expand(w.shape[0]) if w.scale.dim() == 0 else w.scale.to(torch.float32)
            for w in (a, b)]
    return FloatWeight(torch.cat([a.data, b.data]), torch.cat(rows), ScaleGranularity.CHANNEL)


class CpuMoEGatherDequantKernel(_SortedMoE):
    name = "cpu_moe_gather_dequant"

    def __init__(self, spec: MoESpec, w13, w2):
        super().__init__(spec)
        self.w13, self.w2 = w13, w2
        per_expert = 4 * 3 * spec.inter * spec.hidden                        # fp32 bytes of w13 + w2
        self.chunk = max(1, DEQUANT_BUDGET_BYTES // per_expert)

    @classmethod
    def can_implement(cls, spec: MoESpec, platform: Platform) -> tuple[bool, str]:
        if not hasattr(torch, "_grouped_mm"):
            return False, "this torch has no _grouped_mm"
        w0 = spec.experts[0][0]
        if isinstance(w0, IntWeight):
            why = _base_checks(spec, IntWeight)
            if not why and not _same_int(spec):
                why = "experts differ in bits/group/zero layout"
        elif isinstance(w0, FloatWeight):
            why = _base_checks(spec, FloatWeight)
            if not why and w0.data.dtype not in FP8_DTYPES:
                why = f"weight dtype {w0.data.dtype} is not fp8"
            if not why and not _same(spec, lambda w: (w.data.dtype, w.granularity, w.block)):
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
    def prepare(cls, spec: MoESpec, platform: Platform) -> CpuMoEGatherDequantKernel:
        if isinstance(spec.experts[0][0], IntWeight):
            return cls(spec, _IntStack([[g, u] for g, u, _ in spec.experts]),
                       _IntStack([[d] for _, _, d in spec.experts]))
        return cls(spec, _Fp8Stack([_cat_float(g, u) for g, u, _ in spec.experts]),
                   _Fp8Stack([d for _, _, d in spec.experts]))

    def _rows(self, xs: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        active = counts.nonzero().flatten()                                   # [A] experts with rows
        cnt = counts[active]
        ends = cnt.cumsum(0)
        out = torch.empty(xs.shape, dtype=torch.float32, device=xs.device)
        for a0 in range(0, active.numel(), self.chunk):
            ex, c = active[a0:a0 + self.chunk], cnt[a0:a0 + self.chunk]
            r0 = int(ends[a0 - 1]) if a0 else 0
            r1 = r0 + int(c.sum())
            offs = c.cumsum(0).to(torch.int32)                               # [A'] group ends
            x = fake_quant_rows(xs[r0:r1], seg[r0:r1], self.acts13)           # [m, H] fp32
            gu = torch._grouped_mm(x, self.w13.dequant(ex), offs=offs)          # [m, 2I]
            h = fake_quant_rows(self._act(gu, seg[r0:r1]), seg[r0:r1], self.acts2)   # [m, I] fp32
            out[r0:r1] = torch._grouped_mm(h, self.w2.dequant(ex), offs=offs)               # [m, H]
        return out


CPU_MOE_KERNELS: list[type[MoEKernel]] = [CpuMoEInt4PackedKernel, CpuMoEInt8PackedKernel,
                                          CpuMoEGatherDequantKernel]
