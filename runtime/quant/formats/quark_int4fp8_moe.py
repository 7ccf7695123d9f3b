"""quark_int4fp8_moe (FORMATS.md §2.11): online, no checkpoint config, dynamic activations only.

Linear layers are Fp8LinearMethod in SGLang: per-channel e4m3 weights quantized at load with dynamic per-token
e4m3 activations, exactly online fp8. MoE experts (`<moe>.experts.<e>.<proj>`) are quantized at load to
symmetric int4, one scale per output channel (SGLang's `quantize_int4_scale_columnwise`):
scale[n] = max_k |w[n, k]| / 7, codes = clamp(round(w / scale), -7, 7), held as an IntWeight (bits 4, per
channel). That is the canonical weight every platform's reference MoE dequantizes. For aiter's fused_moe
(ROCm) the same codes are packed 8 per int32 (`pack_int4_to_int32`, order [0, 2, 4, 6, 1, 3, 5, 7]) and
split into a per-tensor fp8 scale (max|w| / 448, the fp8 range of the upcast) and int4 scales divided by it;
`fp8_split_scales` derives both from the canonical weight, so nothing extra is stored here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from quantrt.errors import CheckpointError, ConfigError
from quantrt.quant.format import register_format
from quantrt.quant.formats.fp8 import Fp8Format
from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, IntWeight

if TYPE_CHECKING:
    from quantrt.server_args import ServerArgs

INT4_MAX = 7
FP8_MAX = 448.0


def is_expert_prefix(prefix: str) -> bool:
    """`model.layers.3.mlp.experts.7.gate_proj` (a routed expert's projection)."""
    parts = prefix.split(".")
    return len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit()


def quantize_int4_per_channel(w: torch.Tensor) -> IntWeight:
    """w [N, K] float -> IntWeight(int4 codes in int8 [N, K], scale [N, 1] fp32, per channel)."""
    wf = w.to(torch.float32)
    scale = wf.abs().amax(-1, keepdim=True) / INT4_MAX                          # [N, 1]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (wf / safe).round().clamp(-INT4_MAX, INT4_MAX).to(torch.int8)
    return IntWeight(codes, scale, 4, w.shape[1])


def fp8_split_scales(w: IntWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 per-tensor scale [] = max|w| / 448, int4 scales relative to it [N]): scale = rel * fp8_scale."""
    scale = w.scale.to(torch.float32).reshape(-1)                               # [N]
    fp8_scale = (scale.max() * INT4_MAX / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return fp8_scale, scale / fp8_scale


@register_format
class QuarkInt4Fp8MoeFormat(Fp8Format):
    """Online: linears as online fp8; MoE experts int4 per channel (fp8 compute on aiter)."""

    name = "quark_int4fp8_moe"
    online = True

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> QuarkInt4Fp8MoeFormat:
        if qcfg:
            raise ConfigError("quark_int4fp8_moe quantizes a float checkpoint at load time; this checkpoint "
                              f"already has a quantization config ({qcfg.get('quant_method')})")
        return cls(serialized=False)

    def describe(self) -> str:
        return ("quark_int4fp8_moe (online: linears fp8 per-channel with dynamic per-token activations, "
                "MoE experts int4 per-channel)")

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor],
                    shape: tuple[int, int]) -> IntWeight | FloatWeight:
        if not is_expert_prefix(prefix):
            return super().make_weight(prefix, tensors, shape)
        w = tensors["weight"]
        if tuple(w.shape) != tuple(shape):
            raise CheckpointError(f"{prefix}.weight has shape {tuple(w.shape)}, expected {tuple(shape)}")
        if not w.dtype.is_floating_point or w.element_size() < 2:
            raise CheckpointError(f"{prefix}.weight has dtype {w.dtype}; quark_int4fp8_moe quantizes "
                                  f"float32/bfloat16/float16 experts")
        return quantize_int4_per_channel(w)

    def act_scheme(self, prefix: str) -> ActScheme:
        """Experts: per-token dynamic e4m3 activations (aiter fused_moe PER_TOKEN); linears: as online fp8."""
        if is_expert_prefix(prefix):
            return ActScheme(ActKind.DYNAMIC_TOKEN, torch.float8_e4m3fn)
        return super().act_scheme(prefix)
