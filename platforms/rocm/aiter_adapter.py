"""The one thin adapter between quantrt and AMD's aiter (PyPI `amd-aiter`, imported as `aiter`).

Switched on by `SGLANG_USE_AITER=1` (SGLang's spelling, honoured) or `QUANTRT_USE_AITER=1`, on ROCm only
(FORMATS.md §4.4). Asking for aiter where it is absent is an error, never a silent fallback. The ops:
- pertoken_quant(x, quant_dtype) -> (q, scale [M, 1]): symmetric per-token, scale = rowmax(|x|) / dtype max.
- shuffle_weight(w [N, K], layout=(16, 16)): the preshuffled weight layout of the bpreshuffle GEMMs:
  view [N/16, 16, K/32, 32/P, P] (P = 16 bytes / element size) -> order (N/16, K/32, 32/P, 16, P).
- gemm_a8w8(XQ [M, K], WQ [N, K], x_scale [M, 1], w_scale [1, N], bias, dtype): (XQ @ WQ^T) * x_scale *
  w_scale (+ bias), int8 or fp8 operands; gemm_a8w8_bpreshuffle: the same with WQ shuffled.
- rmsnorm2d_fwd(x, weight, eps) / rmsnorm2d_fwd_with_add(out, x, residual, residual_out, weight, eps).
- rope_cached_positions_2c_fwd_inplace(x, y [S, B, H, D], cos, sin [P, 1, 1, D/2], positions [S, B],
  rotate_style (0 NEOX, 1 GPT-J), reuse_freqs_front_part, nope_first): q and k rotated in place.
- topk_softmax(topk_weights, topk_ids, token_expert_indices, gating_output, renormalize) (outputs in place);
  grouped_topk(gating, w, ids, num_expert_group, topk_group, need_renorm, scoring_func, routed_scaling_factor);
  biased_grouped_topk(gating, correction_bias, w, ids, num_expert_group, topk_group, need_renorm,
  routed_scaling_factor) (DeepSeek-V3). Weights fp32, ids int32.
- fused_moe(hidden, w1 [E, 2I, H], w2 [E, H, I] (both shuffle_weight(., (16, 16))), topk_weight, topk_ids,
  activation (Silu), quant_type (No / per_Token), w1_scale [E, 2I, 1], w2_scale [E, H, 1]); int4 experts are
  int32 words of 8 values (order [0, 2, 4, 6, 1, 3, 5, 7]) that the kernel upcasts to fp8.
- gemm_a8w8_blockscale(XQ [M, K], WQ [N, K], x_scale [M, K/128], w_scale [N/128, K/128], dtype): block fp8.
- paged_attention_rocm(out, exp_sums, max_logits, tmp_out, query [B, H, D], key_cache [nb, Hkv, D/x, bs, x],
  value_cache [nb, Hkv, D, bs], num_kv_heads, scale, block_tables int32, context_lens int32, block_size,
  max_context_len, alibi_slopes, kv_cache_dtype "auto" | "fp8", k_scale, v_scale, fp8_out_scale,
  partition_size): paged decode attention into `out` (x = 16 bytes / cache element size).
`quantrt.platforms.rocm.emulation.EmulatedAiterOps` implements them on CPU (EMULATED, tested in CI).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import TYPE_CHECKING, Any, Protocol

import torch

from quantrt.errors import PlatformError

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

ENV_VARS = ("SGLANG_USE_AITER", "QUANTRT_USE_AITER")
_OPS = ("pertoken_quant", "shuffle_weight", "gemm_a8w8", "gemm_a8w8_bpreshuffle", "rmsnorm2d_fwd",
        "rmsnorm2d_fwd_with_add", "rope_cached_positions_2c_fwd_inplace", "topk_softmax", "grouped_topk",
        "biased_grouped_topk", "gemm_a8w8_blockscale", "paged_attention_rocm")


class AiterOps(Protocol):
    """The aiter operators quantrt calls."""

    def pertoken_quant(self, x: torch.Tensor, quant_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]: ...

    def shuffle_weight(self, x: torch.Tensor, layout: tuple[int, int] = (16, 16)) -> torch.Tensor: ...

    def gemm_a8w8(self, XQ: torch.Tensor, WQ: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor: ...

    def gemm_a8w8_bpreshuffle(self, XQ: torch.Tensor, WQ: torch.Tensor, x_scale: torch.Tensor,
                              w_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor: ...

    def rmsnorm2d_fwd(self, x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor: ...

    def rope_cached_positions_2c_fwd_inplace(self, input_x: torch.Tensor, input_y: torch.Tensor,
                                             cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                                             rotate_style: int, reuse_freqs_front_part: bool,
                                             nope_first: bool) -> None: ...

    def topk_softmax(self, topk_weights: torch.Tensor, topk_indices: torch.Tensor,
                     token_expert_indices: torch.Tensor, gating_output: torch.Tensor, renormalize: bool) -> None: ...

    def grouped_topk(self, gating_output: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     num_expert_group: int, topk_group: int, need_renorm: bool, scoring_func: str = "softmax",
                     routed_scaling_factor: float = 1.0) -> None: ...

    def biased_grouped_topk(self, gating_output: torch.Tensor, correction_bias: torch.Tensor,
                            topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_expert_group: int,
                            topk_group: int, need_renorm: bool, routed_scaling_factor: float = 1.0) -> None: ...

    def fused_moe(self, hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weight: torch.Tensor,
                  topk_ids: torch.Tensor, expert_mask: torch.Tensor | None = None, activation_method: int = 0,
                  quant_method: int = 0, doweight_stage1: bool = False, w1_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, a1_scale: torch.Tensor | None = None,
                  a2_scale: torch.Tensor | None = None) -> torch.Tensor: ...

    def gemm_a8w8_blockscale(self, XQ: torch.Tensor, WQ: torch.Tensor, x_scale: torch.Tensor,
                             w_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor: ...


    def paged_attention_rocm(self, out: torch.Tensor, exp_sums: torch.Tensor, max_logits: torch.Tensor,
                             tmp_out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                             value_cache: torch.Tensor, num_kv_heads: int, scale: float, block_tables: torch.Tensor,
                             context_lens: torch.Tensor, block_size: int, max_context_len: int,
                             alibi_slopes: torch.Tensor | None, kv_cache_dtype: str, k_scale: Any, v_scale: Any,
                             fp8_out_scale: torch.Tensor | None = None, partition_size: int = 256) -> None: ...


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def aiter_requested(environ: dict[str, str] | None = None) -> bool:
    """True when SGLANG_USE_AITER or QUANTRT_USE_AITER is set to 1/true/yes/on."""
    env = os.environ if environ is None else environ
    return any(_truthy(env.get(v)) for v in ENV_VARS)


def load_aiter(find_spec: Any = importlib.util.find_spec, import_module: Any = importlib.import_module) -> Any:
    """Import AMD's aiter or raise a PlatformError that says what to install (tests inject the finders)."""
    if find_spec("aiter") is None:
        raise PlatformError("SGLANG_USE_AITER=1 (or QUANTRT_USE_AITER=1) asks for AMD aiter, but no `aiter` "
                            "module is installed; install amd-aiter for your ROCm (or unset the variable)")
    try:
        mod = import_module("aiter")
    except Exception as e:  # aiter without ROCm raises at import ("ROCm version file not found")
        raise PlatformError(f"SGLANG_USE_AITER=1 but importing aiter failed ({type(e).__name__}: {e})") from None
    missing = [op for op in ("gemm_a8w8", "shuffle_weight") if not hasattr(mod, op)]
    if missing:
        raise PlatformError(f"the installed `aiter` module lacks {', '.join(missing)}: it is not AMD's aiter "
                            "(PyPI `aiter` is an unrelated async library; install amd-aiter)")
    return mod


class RealAiterOps:
    """Forwards every AiterOps call to the aiter module (loaded on construction)."""

    def __init__(self, module: Any = None) -> None:
        self._mod = module if module is not None else load_aiter()

    def __getattr__(self, name: str) -> Any:
        if name not in _OPS:
            raise AttributeError(name)
        return getattr(self._mod, name)

    def fused_moe(self, hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weight: torch.Tensor,
                  topk_ids: torch.Tensor, expert_mask: torch.Tensor | None = None, activation_method: int = 0,
                  quant_method: int = 0, doweight_stage1: bool = False, **scales: Any) -> torch.Tensor:
        """aiter.fused_moe takes ActivationType / QuantType enums: 0 = Silu / No, 2 = per_Token."""
        return self._mod.fused_moe(hidden_states, w1, w2, topk_weight, topk_ids, expert_mask=expert_mask,
                                   activation=self._mod.ActivationType(activation_method),
                                   quant_type=self._mod.QuantType(quant_method),
                                   doweight_stage1=doweight_stage1, **scales)


def aiter_ops_of(platform: Platform) -> AiterOps | None:
    """The platform's aiter ops when aiter is switched on for it, else None."""
    get = getattr(platform, "aiter_ops", None)
    return get() if callable(get) else None
