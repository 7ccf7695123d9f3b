"""The CUDA platform's decode attention entries for `PagedAttention` (`Platform.decode_attention_ref`,
`Platform.decode_rotary_attention_op`): which pools and layers the Triton kernel serves (`paged_attention_triton`),
the decode step's rotary + KV write + attention in one launch, and the questions the layers ask before the step (a
grid small enough to be released early; whether the kernel takes the q/k/v bias and q/k norms, `QKVPrologue`)."""

from __future__ import annotations

import os

import torch

from quantrt.platforms.cuda.kernels.paged_attention_triton import (
    BLOCK_L,
    EARLY_MAX_PROGRAMS,
    NewToken,
    key_chunks,
    kv_format,
    paged_decode_attention,
)
from quantrt.platforms.cuda.kernels.rope_kv_triton import can_fuse_rotary_kv_store, pool_format


def _served(layer, q: torch.Tensor, fb) -> tuple | None:
    """(KV_FMT, kv_lens on the device, k_sc, v_sc) when this kernel serves the layer's decode over fb's pool, else
    None (the layer then runs SDPA)."""
    pool = fb.kv_pool
    fmt, _ = kv_format(pool)
    d = layer.head_dim
    if fmt < 0 or d < 16 or d & (d - 1) or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    i = layer.layer_id
    if not getattr(pool, "has_v", True):
        return None                                      # MLA latent cache: no V rows
    kd = pool.k[i].shape[-1] * (2 if fmt == 4 else 1)
    if q.dim() != 3 or q.shape[-1] != d or kd != d or pool.v[i].shape != pool.k[i].shape:
        return None                                      # another layout (e.g. MLA latents): not this kernel
    lens = fb.kv_lens_t if getattr(fb, "kv_lens_t", None) is not None else fb.cache.get("kv_lens_dev")
    if lens is None:
        lens = fb.cache["kv_lens_dev"] = torch.tensor(fb.kv_lens, dtype=torch.int32, device=q.device)
    return fmt, lens, pool.k_sc[i] if fmt == 4 else None, pool.v_sc[i] if fmt == 4 else None


def decode_attention(layer, q: torch.Tensor, fb, sinks: torch.Tensor | None = None) -> torch.Tensor | None:
    """The CUDA platform's decode attention for `PagedAttention` (see `Platform.decode_attention_ref`):
    q [B, H, D] -> [B, H*D], or None when this pool/layer is not served (the layer then runs SDPA)."""
    served = _served(layer, q, fb)
    if served is None:
        return None
    fmt, lens, k_sc, v_sc = served
    pool, i = fb.kv_pool, layer.layer_id
    o = paged_decode_attention(q, pool.k[i], pool.v[i], fb.kv_slots, lens, layer.scale, fmt, layer.window,
                               layer.k_scale, layer.v_scale, k_sc, v_sc, sinks)
    return o.reshape(q.shape[0], -1)


def decode_rotary_attention(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, fb, sinks: torch.Tensor | None = None, pre=None) -> torch.Tensor | None:
    """`Platform.decode_rotary_attention_op` on CUDA: a decode step's rotary (neox), KV write and attention in one
    launch. q [B, H, D], k, v [B, Hkv, D] unrotated (views of the qkv output) -> [B, H*D], the same as
    `rotary_kv_store` then `decode_attention`; None, with nothing written, where either declines. `pre` (a
    `QKVPrologue` that `_takes_prologue` accepted): q, k, v lack the projection's bias and the q/k norms, which the
    kernel applies in its load (`NewToken.bias` / `norm`)."""
    pool, i = fb.kv_pool, layer.layer_id
    served = _served(layer, q, fb)
    ok, _ = can_fuse_rotary_kv_store(q, k, v, cos, sin, pool, i)
    wfmt, _ = pool_format(pool)
    if served is None or not ok or wfmt != served[0] or fb.positions.shape[0] != q.shape[0]:
        return None
    fmt, lens, k_sc, v_sc = served
    new = NewToken(k, v, cos, sin, fb.positions, fb.out_slots, wfmt, **_prologue_fields(pre))
    o = paged_decode_attention(q, pool.k[i], pool.v[i], fb.kv_slots, lens, layer.scale, fmt, layer.window,
                               layer.k_scale, layer.v_scale, k_sc, v_sc, sinks, new=new)
    return o.reshape(q.shape[0], -1)


def _small_grid(layer, fb, rows: int) -> bool:
    """`PagedAttention.small_decode` on CUDA: this step's decode grid (rows x KV heads x key splits, as
    `paged_decode_attention` picks them) has at most EARLY_MAX_PROGRAMS programs."""
    s, _ = key_chunks(rows, layer.num_kv_heads, fb.kv_slots.shape[1], BLOCK_L)
    return rows * layer.num_kv_heads * s <= EARLY_MAX_PROGRAMS


def _takes_prologue(layer, pre) -> bool:
    """`PagedAttention.takes_prologue` on CUDA: the kernel adds any q/k/v bias and makes the per-head q/k norms
    where they are plain `RMSNorm`s without a bias of their own, with one eps and one kind (weight, or Gemma's
    1 + w). QUANTRT_CUDA_QKV_PROLOGUE=0: never (the layers' launches, for A/B)."""
    from quantrt.layers.norm import RMSNorm

    if os.environ.get("QUANTRT_CUDA_QKV_PROLOGUE", "1") == "0":
        return False
    qn, kn = pre.q_norm, pre.k_norm
    return qn is None or (type(qn) is RMSNorm and type(kn) is RMSNorm and qn.bias is None and kn.bias is None
                          and qn.offset == kn.offset and qn.eps == kn.eps and qn._scale is not None
                          and kn._scale is not None)


def _prologue_fields(pre) -> dict:
    """NewToken's bias / norm fields of a `QKVPrologue` (none without one)."""
    if pre is None:
        return {}
    qn, kn = pre.q_norm, pre.k_norm
    norm = (qn._scale, kn._scale, float(qn.eps), 2 if qn.offset else 1) if qn is not None else None
    return {"bias": pre.bias, "norm": norm}


decode_rotary_attention.small_grid = _small_grid
decode_rotary_attention.takes_prologue = _takes_prologue


__all__ = ["decode_attention", "decode_rotary_attention"]
