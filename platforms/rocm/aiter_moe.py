"""aiter fused_moe for ROCm MoE layers (`ROCM_MOE_KERNELS`), active with SGLANG_USE_AITER=1 / QUANTRT_USE_AITER=1.

One kernel, three expert schemes (FORMATS.md §4.4, §2.11), weights preshuffled with shuffle_weight(., (16, 16)):
- dense bf16/fp16 experts: QuantType.No;
- fp8 per-channel / per-tensor experts with dynamic per-token fp8 activations: QuantType.per_Token, e4m3fn
  converted to e4m3fnuz on MI300 (scales x2, FORMATS.md fact 7), w*_scale [E, N, 1];
- quark_int4fp8_moe's int4 per-channel experts: packed 8 per int32 (order [0, 2, 4, 6, 1, 3, 5, 7]) and
  upcast to fp8 in the kernel, per-token fp8 activations; the post-GEMM scale is int4_scale * fp8_scale,
  which is the canonical per-channel scale (SGLang's split into the two cancels; on gfx942 its 0.5 / 2
  fnuz factors cancel too).
Otherwise it declines with the reason, and the next MoE kernel (or the portable ones) runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantrt.platforms.rocm.aiter_adapter import AiterOps, aiter_ops_of
from quantrt.platforms.rocm.fnuz import weight_to_fnuz
from quantrt.quant.moe_kernel import MoEKernel, MoESpec
from quantrt.quant.weights import ActKind, DenseWeight, FloatWeight, IntWeight, ScaleGranularity

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

QUANT_NO, QUANT_PER_TOKEN = 0, 2   # aiter QuantType.No, QuantType.per_Token
SILU = 0                           # aiter ActivationType.Silu
_HALF = (torch.float16, torch.bfloat16)


def pack_int4_words(codes: torch.Tensor) -> torch.Tensor:
    """int4 values [..., K] (int8) -> int32 [..., K/8]: nibble i holds element [0, 2, 4, 6, 1, 3, 5, 7][i]
    of each group of 8 (SGLang's pack_int4_to_int32 with reorder, what aiter's int4 MoE reads)."""
    v = (codes.to(torch.int64) & 0xF).reshape(*codes.shape[:-1], -1, 8)[..., [0, 2, 4, 6, 1, 3, 5, 7]]
    word = (v << (4 * torch.arange(8, dtype=torch.int64, device=codes.device))).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _kind(spec: MoESpec) -> tuple[str, str]:
    """("dense" | "fp8" | "int4", "") or ("", why not)."""
    ws = [w for ex in spec.experts for w in ex]
    acts = [a for ex in spec.acts for a in ex]
    if all(isinstance(w, DenseWeight) for w in ws):
        if any(a.kind is not ActKind.NONE for a in acts):
            return "", "dense experts with quantized activations"
        return "dense", ""
    fp8_act = all(a.kind is ActKind.DYNAMIC_TOKEN and a.dtype == torch.float8_e4m3fn for a in acts)
    if all(isinstance(w, FloatWeight) for w in ws):
        if any(w.granularity is ScaleGranularity.BLOCK or w.data.dtype not in
               (torch.float8_e4m3fn, torch.float8_e4m3fnuz) for w in ws):
            return "", "fp8 experts must be e4m3 per-tensor or per-channel (block-scaled MoE is not wired)"
        return ("fp8", "") if fp8_act else ("", "fp8 experts need dynamic per-token fp8 activations")
    if all(isinstance(w, IntWeight) for w in ws):
        if any(w.bits != 4 or w.group_size != w.shape[1] or w.zero is not None or w.offset is not None
               or w.g_idx is not None for w in ws):
            return "", "int experts must be symmetric per-channel int4 (quark_int4fp8_moe)"
        return ("int4", "") if fp8_act else ("", "int4 experts need dynamic per-token fp8 activations")
    return "", f"{'/'.join(sorted(spec.schemes()))} experts are not served by aiter fused_moe"


class AiterFusedMoEKernel(MoEKernel):
    """aiter.fused_moe over preshuffled stacked experts (w1 [E, 2I, H], w2 [E, H, I])."""

    name = "aiter_fused_moe"

    def __init__(self, ops: AiterOps, w1: torch.Tensor, w2: torch.Tensor, s1: torch.Tensor | None,
                 s2: torch.Tensor | None, quant: int, dtype: torch.dtype):
        self.ops, self.w1, self.w2, self.s1, self.s2, self.quant, self.dtype = ops, w1, w2, s1, s2, quant, dtype

    @classmethod
    def can_implement(cls, spec: MoESpec, platform: Platform) -> tuple[bool, str]:
        if aiter_ops_of(platform) is None:
            return False, "aiter is off (set SGLANG_USE_AITER=1 on ROCm)"
        if spec.activation != "silu":
            return False, f"activation {spec.activation}: aiter fused_moe is wired for silu"
        if spec.has_bias:
            return False, "per-expert biases: aiter fused_moe takes no expert biases"
        if spec.compute_dtype not in _HALF:
            return False, f"compute dtype {spec.compute_dtype}: aiter fused_moe runs float16/bfloat16"
        kind, why = _kind(spec)
        if not kind:
            return False, why
        k_align = 256 if kind == "int4" else 32  # the (16, 16) shuffle tiles 16 rows x 16 bytes x 2 along K
        if spec.inter % 16 or spec.hidden % 16 or spec.hidden % k_align or spec.inter % k_align:
            return False, (f"hidden {spec.hidden} / intermediate {spec.inter} do not tile the (16, 16) weight "
                           f"shuffle (multiples of 16 rows and {k_align} along K)")
        return True, ""

    @classmethod
    def prepare(cls, spec: MoESpec, platform: Platform) -> AiterFusedMoEKernel:
        ops: AiterOps = aiter_ops_of(platform)  # type: ignore[assignment]
        kind, _ = _kind(spec)
        dev, dt = platform.device(), spec.compute_dtype
        fnuz = getattr(platform, "is_fp8_fnuz", lambda: False)()

        def stack(proj: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
            data, scales = [], []
            for ex in spec.experts:
                ws = ex[proj]
                if kind == "dense":
                    data.append(torch.cat([w.data.to(dt) for w in ws]))
                    continue
                if kind == "fp8":
                    ws = [weight_to_fnuz(w) if fnuz else w for w in ws]
                    data.append(torch.cat([w.data for w in ws]))
                    scales.append(torch.cat([w.scale.to(torch.float32).reshape(-1).expand(w.shape[0])
                                             for w in ws]))
                else:
                    data.append(pack_int4_words(torch.cat([w.codes for w in ws])))
                    scales.append(torch.cat([w.scale.to(torch.float32).reshape(-1) for w in ws]))
            w = ops.shuffle_weight(torch.stack(data).to(dev), (16, 16))                  # [E, N, K']
            s = torch.stack(scales)[..., None].to(dev) if scales else None               # [E, N, 1]
            return w, s

        w1, s1 = stack(slice(0, 2))
        w2, s2 = stack(slice(2, 3))
        return cls(ops, w1, w2, s1, s2, QUANT_NO if kind == "dense" else QUANT_PER_TOKEN, dt)

    def apply(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; weights, ids: [T, k] -> [T, H]
        scales = {} if self.s1 is None else {"w1_scale": self.s1, "w2_scale": self.s2}
        return self.ops.fused_moe(x.to(self.dtype), self.w1, self.w2, weights.to(torch.float32),
                                  ids.to(torch.int32), activation_method=SILU, quant_method=self.quant, **scales)


ROCM_MOE_KERNELS: list[type[MoEKernel]] = [AiterFusedMoEKernel]
