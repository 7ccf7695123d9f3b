"""Ascend MoE kernels (`NPU_MOE_KERNELS`): msModelSlim W8A8_DYNAMIC / W4A8_DYNAMIC / W4A4_DYNAMIC experts through
the NpuOps adapter, the way vllm-ascend runs them (FORMATS.md §2.13):

  tokens sorted by expert -> npu_dynamic_quant (per-token int8, or int4 for W4A4) ->
  npu_grouped_matmul(w13 [E, H, 2I], scale [E, 2I] or per-K-group [E, H/G, 2I], per_token_scale,
  group_list = rows per expert, cumulative) -> SwiGLU in the compute dtype -> npu_dynamic_quant ->
  npu_grouped_matmul(w2 [E, I, H]) -> routing weights -> scatter-add back to the tokens.

Weights are symmetric (msModelSlim MoE offsets are zero) and stored [K, N] like the NPU linears; W4A4 operands
are int4 packed 8 per int32. Not modelled (EMULATED): the int64 packing of scales, W4A8's unsigned-int4
`scale_bias` trick and the NZ layout. Other expert schemes decline with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from quantrt.layers.moe.experts import grouped_layout
from quantrt.platforms.ascend.npu_adapter import NpuOps, npu_ops_of
from quantrt.quant.moe_kernel import MoEKernel, MoESpec
from quantrt.quant.weights import ActKind, IntWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

_HALF = (torch.float16, torch.bfloat16)


def _scheme(spec: MoESpec) -> tuple[str, str]:
    """("w8a8" | "w4a8" | "w4a4", "") or ("", why not)."""
    ws = [w for ex in spec.experts for w in ex]
    acts = {(a.kind, a.dtype) for ex in spec.acts for a in ex}
    if not all(isinstance(w, IntWeight) for w in ws):
        return "", f"{'/'.join(sorted(spec.schemes()))} experts: the NPU grouped matmul takes int weights"
    if any(w.zero is not None or w.offset is not None or w.g_idx is not None or w.codes.dtype != torch.int8
           for w in ws):
            return "", "needs symmetric int8-held codes (no zero point, offset or g_idx)"
    bits = {w.bits for w in ws}
    if len(acts) != 1 or len(bits) != 1:
        return "", "experts mix weight widths or activation schemes"
    (kind, dtype), b = next(iter(acts)), next(iter(bits))
    if kind is not ActKind.DYNAMIC_TOKEN:
        return "", f"activations {kind}: the NPU MoE path quantizes per token (npu_dynamic_quant)"
    grouped = any(w.group_size != w.shape[1] for w in ws)
    if b == 8 and dtype == torch.int8 and not grouped:
        return "w8a8", ""
    if b == 4 and dtype == torch.int8:
        return "w4a8", ""
    if b == 4 and dtype == torch.int4 and not grouped:
        return "w4a4", ""
    return "", f"int{b} weights{' per group' if grouped else ''} with {dtype} activations are not an NPU MoE scheme"


class NpuGroupedMoEKernel(MoEKernel):
    """msModelSlim dynamic-quant experts on npu_dynamic_quant + npu_grouped_matmul."""

    name = "npu_grouped_matmul_moe"

    def __init__(self, ops: NpuOps, w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                 int4_act: bool, dtype: torch.dtype):
        self.ops, self.w13, self.s13, self.w2, self.s2 = ops, w13, s13, w2, s2
        self.int4_act, self.dtype = int4_act, dtype

    @classmethod
    def can_implement(cls, spec: MoESpec, platform: Platform) -> tuple[bool, str]:
        if npu_ops_of(platform) is None:
            return False, f"platform {platform.name} has no torch_npu ops"
        if spec.activation != "silu":
            return False, f"activation {spec.activation}: the NPU MoE path is SwiGLU"
        if spec.has_bias:
            return False, "per-expert biases: the NPU MoE path takes no expert biases"
        if spec.compute_dtype not in _HALF:
            return False, f"compute dtype {spec.compute_dtype}: npu_dynamic_quant takes float16/bfloat16"
        kind, why = _scheme(spec)
        if kind == "w4a4" and (spec.hidden % 8 or spec.inter % 8):
            return False, "W4A4 packs 8 int4 per int32 along K: hidden and intermediate must be multiples of 8"
        return (True, "") if kind else (False, why)

    @classmethod
    def prepare(cls, spec: MoESpec, platform: Platform) -> NpuGroupedMoEKernel:
        ops: NpuOps = npu_ops_of(platform)  # type: ignore[assignment]
        kind, _ = _scheme(spec)
        dev = platform.device()

        def stack(proj: slice) -> tuple[torch.Tensor, torch.Tensor]:
            ws, ss = [], []
            for ex in spec.experts:
                parts: list[IntWeight] = list(ex[proj])  # type: ignore[arg-type]
                codes = torch.cat([w.codes for w in parts]).t().contiguous()                 # [K, N] int8
                ws.append(ops.npu_convert_weight_to_int4pack(codes.to(torch.int32)) if kind == "w4a4" else codes)
                scale = torch.cat([w.scale.to(torch.float32) for w in parts])                # [N, G]
                ss.append(scale[:, 0] if scale.shape[1] == 1 else scale.t().contiguous())    # [N] | [G, N]
            return torch.stack(ws).to(dev), torch.stack(ss).to(dev)

        w13, s13 = stack(slice(0, 2))
        w2, s2 = stack(slice(2, 3))
        return cls(ops, w13, s13, w2, s2, kind == "w4a4", spec.compute_dtype)

    def _gmm(self, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        q, pts = self.ops.npu_dynamic_quant(x, dst_type=torch.quint4x2 if self.int4_act else None)
        return self.ops.npu_grouped_matmul([q], [w], scale=[s], per_token_scale=[pts], group_list=ends,
                                           split_item=2, group_type=0, group_list_type=0,
                                           output_dtype=self.dtype)[0]

    def apply(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; weights, ids: [T, k] -> [T, H]
        order, tok, _, counts = grouped_layout(ids, self.w13.shape[0])
        ends = counts.cumsum(0)                                                  # [E] cumulative row ends
        g, u = self._gmm(x[tok].to(self.dtype), self.w13, self.s13, ends).chunk(2, dim=-1)   # [T*k, I]
        y = self._gmm(F.silu(g) * u, self.w2, self.s2, ends)                                  # [T*k, H]
        y = y.float() * weights.flatten()[order, None].float()
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tok, y).to(self.dtype)


NPU_MOE_KERNELS: list[type[MoEKernel]] = [NpuGroupedMoEKernel]
