"""What the KV cache holds, as a dict for logs, `/get_server_info` and `quantrt env`-style output."""

from __future__ import annotations

from typing import Any

import torch

from quantrt.engine.kv_quant import KVCacheSpec, KVKind

GIB = 2**30


def _storage(spec: KVCacheSpec) -> str:
    if spec.kind is KVKind.FP4:
        return "uint8 e2m1 codes (2/byte) + uint8 power-of-two scale per 16 elements"
    if spec.kind is KVKind.FP8:
        return f"uint8 bits of {str(spec.dtype).removeprefix('torch.')}"
    return str(spec.dtype).removeprefix("torch.")


def kv_cache_info(engine) -> dict[str, Any]:
    """kv_cache_dtype, storage, bytes_per_token, max_total_tokens, pool_bytes, tokens_per_gib,
    capacity_vs_bf16 (tokens held per byte relative to a bf16 cache), kv_scales_from_checkpoint,
    kv_layout (the model's KV geometry: heads x head_dim K+V, or the MLA latent row)."""
    from quantrt.layers.attention import PagedAttention

    geo = engine.kv_geometry
    spec: KVCacheSpec = engine.kv_spec
    bf16 = geo.bytes_per_token(KVCacheSpec("bf16", KVKind.PLAIN, torch.bfloat16))
    bpt = engine.kv_bytes_per_token
    attn = [m for m in engine.model.modules() if isinstance(m, PagedAttention)]
    calibrated = sum((m.k_scale != 1.0) + (m.v_scale != 1.0) for m in attn)
    return {
        "kv_cache_dtype": spec.name,
        "storage": _storage(spec),
        "bytes_per_token": bpt,
        "max_total_tokens": engine.allocator.num_pages * engine.allocator.page_size,
        "page_size": engine.allocator.page_size,
        "pool_bytes": engine.kv_pool.nbytes(),
        "tokens_per_gib": GIB / bpt,
        "capacity_vs_bf16": bf16 / bpt,
        "kv_scales_not_one": int(calibrated),
        "kv_layout": (f"{geo.num_kv_heads} x {geo.head_dim} K + V per layer" if geo.has_v else
                      f"MLA latent: {geo.head_dim} (kv_lora_rank + qk_rope_head_dim) per layer, no V"),
    }
