"""CPU MoE kernels for quantized experts, in preference order (`CPU_MOE_KERNELS`).

All sort the T*k (token, expert) pairs by expert once (cpu_moe_sorted.SortedMoE), run each active expert on
its contiguous row segment, scale by the routing weights and index_add back: no per-token Python work.
Weights stay quantized in memory (packed int4, int8, fp8, fp4 + e8m0); nothing is dequantized at prepare.

- `CpuMoEInt4PackedKernel`: int (bits <= 4, groups that are multiples of 32; AWQ/GPTQ/compressed-tensors
  W4A16 = moe_wna16, GGUF Q4_0/Q4_1) with bf16/fp16 compute: per active expert two calls of torch's packed
  int4 CPU GEMM (`_weight_int4pack_mm_for_cpu`, gate+up fused). fp32 compute is refused for the same
  reason as the linear kernel (the op rounds activations to bf16).
- `CpuMoEInt8PackedKernel`: symmetric per-channel int8 weight-only in bf16/fp16: per active expert with at
  most PACK_MAX_ROWS rows `_weight_int8pack_mm` (reads 1 byte per weight), above that the dequant path
  (fp32 math). W8A8 int8 is left to the dequant kernel: the op's fp32 flavour (needed for exact int8
  activation codes) is 4-15x slower than an int8->fp32 copy + fp32 GEMM at every row count.
- `CpuMoEMxfp4Kernel` (cpu_moe_mxfp4): MXFP4 experts (gpt-oss), fp4 codes + e8m0 bytes, per-tile dequant.
- `CpuMoEDequantKernel` (cpu_moe_dequant): every IntWeight / fp8 FloatWeight, weight-only or with int8/fp8
  activations: per active expert, dequantize tile by tile into a reused buffer, fp32 BLAS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantrt.platforms.xpu.cpu_moe_dequant import CpuMoEDequantKernel, IntMats
from quantrt.platforms.xpu.cpu_moe_mxfp4 import CpuMoEMxfp4Kernel
from quantrt.platforms.xpu.cpu_moe_sorted import SortedMoE, base_checks, same_int
from quantrt.quant.moe_kernel import MoEKernel, MoESpec
from quantrt.quant.weights import ActKind, IntWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

PACK_MAX_ROWS = 16                 # rows of one expert above which the int8 op's bf16 path is slower than
#                                    the fp32 dequant path (cpu_kernels.INT8PACK_MAX_M)


def _gidx_mismatch(g: IntWeight, u: IntWeight) -> bool:
    return g.g_idx is not None and not torch.equal(g.g_idx, u.g_idx)


def _cat_int(a: IntWeight, b: IntWeight) -> IntWeight:
    """gate [I, H] and up [I, H] -> one IntWeight [2I, H] (same layout and act-order, checked by the caller)."""
    def cat(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None or y is None else torch.cat([x, y])

    return IntWeight(torch.cat([a.codes, b.codes]), torch.cat([a.scale, b.scale]), a.bits, a.group_size,
                     cat(a.zero, b.zero), cat(a.offset, b.offset), a.g_idx)


# -- per active expert: torch's packed int4 / int8 CPU GEMMs -----------------------------------------------
class CpuMoEInt4PackedKernel(SortedMoE):
    name = "cpu_moe_int4_packed"

    def __init__(self, spec: MoESpec, w13: list, w2: list):
        super().__init__(spec)
        self.w13, self.w2 = w13, w2                       # per expert a prepared CpuInt4PackedKernel

    @classmethod
    def can_implement(cls, spec: MoESpec, platform: Platform) -> tuple[bool, str]:
        from quantrt.platforms.xpu.cpu_int_kernels import CpuInt4PackedKernel
        from quantrt.quant.kernel import LinearSpec

        why = base_checks(spec, IntWeight)
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
        if not same_int(spec):
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


class CpuMoEInt8PackedKernel(SortedMoE):
    name = "cpu_moe_int8_packed"

    def __init__(self, spec: MoESpec, w13: IntMats, w2: IntMats):
        super().__init__(spec)
        self.w13, self.w2 = w13, w2             # int8 codes [E, N, K] and bf16 scales shared by the op and the mats
        self.s13, self.s2 = w13.s[:, :, 0], w2.s[:, :, 0]                                  # [E, N] views

    @classmethod
    def can_implement(cls, spec: MoESpec, platform: Platform) -> tuple[bool, str]:
        why = base_checks(spec, IntWeight)
        if why:
            return False, why
        w = spec.experts[0][0]
        if (not same_int(spec) or w.bits != 8 or w.codes.dtype != torch.int8
                or any(x.group_size != x.shape[1] for ex in spec.experts for x in ex)):
            return False, f"needs symmetric per-channel int8 codes (experts are {'/'.join(sorted(spec.schemes()))})"
        if w.zero is not None or w.offset is not None or w.g_idx is not None:
            return False, "needs symmetric int8 without zero point or act-order"
        a = spec.acts[0][0]
        if a.kind is not ActKind.NONE:
            return False, (f"activations {a}: weight-only kernel (int8 W8A8 runs cpu_moe_dequant, faster than "
                           f"the op's fp32 path)")
        if spec.compute_dtype == torch.float32:
            return False, "weight-only in float32: the op rounds activations to bf16 (use --dtype bfloat16)"
        return True, ""

    @classmethod
    def prepare(cls, spec: MoESpec, platform: Platform) -> CpuMoEInt8PackedKernel:
        bf = torch.bfloat16                                   # the op's scale dtype, also used by the fp32 path
        return cls(spec, IntMats([[g, u] for g, u, _ in spec.experts], scale_dtype=bf),
                   IntMats([[d] for _, _, d in spec.experts], scale_dtype=bf))

    def _mm(self, x: torch.Tensor, mats: IntMats, s: torch.Tensor, e: int) -> torch.Tensor:
        if x.shape[0] > PACK_MAX_ROWS:    # many rows: this expert dequantized tile by tile, fp32 GEMM
            return mats.mm(x.float(), e)
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), mats.codes[e], s[e]).float()

    def _rows(self, xs: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = torch.empty(xs.shape, dtype=torch.float32, device=xs.device)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                h = self._act(self._mm(xs[start:start + c], self.w13, self.s13, e), e)          # [c, I]
                out[start:start + c] = self._mm(h, self.w2, self.s2, e)
                start += c
        return out


CPU_MOE_KERNELS: list[type[MoEKernel]] = [CpuMoEInt4PackedKernel, CpuMoEInt8PackedKernel, CpuMoEMxfp4Kernel,
                                          CpuMoEDequantKernel]
