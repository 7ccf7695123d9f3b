"""The one thin adapter between quantrt and torch_npu: the handful of torch_npu ops the NPU kernels call.

`NpuOps` is the protocol; `TorchNpuOps` forwards to the real torch_npu (imported lazily through the
platform's guarded import, never at module import); `quantrt.platforms.ascend.emulation.EmulatedNpuOps`
implements the same calls on CPU following the documented semantics (torch_npu API reference / CANN
aclnn docs), so the kernels are tested here without an NPU. Emulated is not the same as run on hardware.

Documented semantics the kernels rely on (and the emulation follows):
- npu_quantize(x, scales, zero_points, dtype, axis, div_mode=False): q = x * scales + zero_points -> int8.
- npu_dynamic_quant(x, dst_type=int8|quint4x2): symmetric per-token, scale = rowmax(|x|) / DTYPE_MAX,
  q = round(x / scale); int4 results come packed 8 per int32 along the last dimension.
- npu_quant_matmul(x1, x2, scale, offset=, pertoken_scale=, bias=, output_dtype=): int8 (or int4 packed
  in int32) x1 [M, K] @ x2 [K, N]; bias int32: (x1@x2 + bias) * scale [* pertoken]; bias float:
  x1@x2 * scale [* pertoken] + bias.
- npu_weight_quant_batchmatmul(x, weight [K, N] int8, antiquant_scale, antiquant_offset, bias=):
  y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias.
- npu_grouped_matmul(x, weight, bias=, scale=, per_token_scale=, group_list=, split_item=, group_type=,
  group_list_type=, output_dtype=): one matmul per group of rows; int8/int4 operands are dequantized by the
  per-channel (or per-K-group) `scale` and the per-row `per_token_scale` (the MoE path of vllm-ascend).
- npu_convert_weight_to_int4pack(w int32 [K, N] holding int4): -> int32 [K, N/8].
- npu_fused_infer_attention_score(query, key, value, atten_mask=, actual_seq_lengths=, actual_seq_lengths_kv=,
  block_table=, num_heads=, scale=, pre_tokens=, next_tokens=, input_layout=BSH|BSND|BNSD|TND,
  num_key_value_heads=, sparse_mode=0|2|3|4, block_size=, softmax_lse_flag=) -> (out, softmax_lse): softmax(
  scale * Q K^T masked) V per head, head h reading KV head h // (N / N_kv); paged KV (block_table int32
  [B, max_blocks], key/value (blocknum, block_size, N_kv*D) or (blocknum, N_kv, block_size, D)); atten_mask
  1/True = masked; sparse_mode 2/3/4 (left-up causal / right-down causal / band) take the compressed
  2048x2048 upper-triangular mask; TND lengths are cumulative. (torch_npu < 2.5 spells `scale` scale_value.)
- npu_moe_gating_top_k_softmax(x [T, E], finished=None, k) -> (top-k of softmax(x) [T, k], expert_idx int32,
  row_idx int32 = j * T + i); not renormalized.
- npu_moe_gating_top_k(x, k, bias=, k_group=, group_count=, group_select_mode=0 max | 1 top-2 sum, renorm=0,
  norm_type=0 softmax | 1 sigmoid, out_flag=, routed_scaling_factor=, eps=) -> (y, expert_idx int32, norm):
  groups ranked on norm + bias, experts chosen on norm + bias, y = norm / (sum + eps) * routed_scaling_factor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform


class NpuOps(Protocol):
    """The torch_npu operators quantrt calls (keyword names as torch_npu spells them)."""

    def npu_quantize(self, x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                     dtype: torch.dtype, axis: int = -1, div_mode: bool = True) -> torch.Tensor: ...

    def npu_dynamic_quant(self, x: torch.Tensor, *, smooth_scales: torch.Tensor | None = None,
                          dst_type: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def npu_quant_matmul(self, x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *,
                         offset: torch.Tensor | None = None, pertoken_scale: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None,
                         output_dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def npu_weight_quant_batchmatmul(self, x: torch.Tensor, weight: torch.Tensor,
                                     antiquant_scale: torch.Tensor,
                                     antiquant_offset: torch.Tensor | None = None,
                                     quant_scale: torch.Tensor | None = None,
                                     quant_offset: torch.Tensor | None = None,
                                     bias: torch.Tensor | None = None,
                                     antiquant_group_size: int = 0) -> torch.Tensor: ...

    def npu_grouped_matmul(self, x: list[torch.Tensor], weight: list[torch.Tensor], *,
                           bias: list[torch.Tensor] | None = None, scale: list[torch.Tensor] | None = None,
                           per_token_scale: list[torch.Tensor] | None = None, group_list: Any = None,
                           split_item: int = 0, group_type: int | None = None, group_list_type: int = 0,
                           output_dtype: torch.dtype | None = None) -> list[torch.Tensor]: ...

    def npu_convert_weight_to_int4pack(self, weight: torch.Tensor) -> torch.Tensor: ...

    def npu_fused_infer_attention_score(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                        **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]: ...

    def npu_moe_gating_top_k_softmax(self, x: torch.Tensor, finished: torch.Tensor | None = None, k: int = 1
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def npu_moe_gating_top_k(self, x: torch.Tensor, k: int, **kwargs: Any
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


_OPS = ("npu_quantize", "npu_dynamic_quant", "npu_quant_matmul", "npu_weight_quant_batchmatmul",
        "npu_grouped_matmul", "npu_convert_weight_to_int4pack", "npu_moe_gating_top_k_softmax",
        "npu_moe_gating_top_k")


class TorchNpuOps:
    """Forwards every NpuOps call to torch_npu (imported on first use with the guarded import)."""

    def __init__(self, module: Any = None) -> None:
        self._mod = module

    def _torch_npu(self) -> Any:
        if self._mod is None:
            import importlib

            from quantrt.platforms.ascend import import_torch_npu

            import_torch_npu()
            self._mod = importlib.import_module("torch_npu")
        return self._mod

    def __getattr__(self, name: str) -> Any:
        if name not in _OPS:
            raise AttributeError(name)
        return getattr(self._torch_npu(), name)

    def npu_fused_infer_attention_score(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                        **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Newer torch_npu spells the softmax scale `scale`, older releases `scale_value`."""
        op = self._torch_npu().npu_fused_infer_attention_score
        try:
            return op(query, key, value, **kwargs)
        except TypeError as e:
            if "scale" not in kwargs or "scale" not in str(e):
                raise
            kwargs["scale_value"] = kwargs.pop("scale")
            return op(query, key, value, **kwargs)


def npu_ops_of(platform: Platform) -> NpuOps | None:
    """The platform's NpuOps (AscendPlatform: torch_npu; the emulated platform: CPU emulation), else None."""
    get = getattr(platform, "npu_ops", None)
    return get() if callable(get) else None
