"""Ascend paged decode attention and MoE gating through the NpuOps adapter (torch_npu on an NPU, the CPU
emulation in tests; EMULATED: no NPU here).

- `npu_decode_attention` is the Ascend platforms' `Platform.decode_attention_ref`: one query token per
  sequence through npu_fused_infer_attention_score in its PagedAttention form (input_layout "BSH", query
  [B, 1, H*D]; key/value caches viewed zero-copy as (blocknum, block_size, Hkv*D); block_table int32
  [B, max_blocks]; actual_seq_lengths_kv = kv_lens; GQA by num_key_value_heads; a sliding window as a bool
  atten_mask [B, 1, 1, max_blocks*block_size] where True = masked). The slot-indexed pool is paged already
  (slot = page * page_size + offset), so the block table is read off the slot table: the largest block size
  in (128, 64, 32, 16) whose table reproduces every valid slot. Declined (None -> SDPA): fp8/fp4 pages, sinks,
  other dtypes, MLA latents, slot tables that are not block-aligned.
- `npu_extend_attention` is their `Platform.extend_attention_ref`: the same op with input_layout "TND" over the
  paged cache (cumulative query ends, per-sequence KV lengths, right-down causal sparse_mode 3, or band
  sparse_mode 4 for a sliding window).
- `NpuTopK` is their `Platform.topk_op`: softmax / no groups / no bias through npu_moe_gating_top_k_softmax
  (renormalized here when the config asks); grouped or biased routing with renormalization through
  npu_moe_gating_top_k (norm_type softmax/sigmoid, group_select_mode max (V2) / top-2 sum (V3)); the rest
  runs quantrt's select_experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from quantrt.platforms.ascend.npu_adapter import NpuOps, npu_ops_of

if TYPE_CHECKING:
    from quantrt.layers.moe.routing import RoutingConfig

_HALF = (torch.float16, torch.bfloat16)
BLOCK_SIZES = (128, 64, 32, 16)


def block_table(kv_slots: torch.Tensor, kv_lens: list[int], num_slots: int,
                sizes: tuple[int, ...] = BLOCK_SIZES) -> tuple[torch.Tensor, int] | None:
    """kv_slots [B, L] (columns past kv_lens[b] ignored) -> (block_table int32 [B, ceil(L/bs)], bs) for the
    first bs in `sizes` such that slot j of sequence b is block_table[b, j // bs] * bs + j % bs, else None.
    Unused table entries are 0."""
    b, length = kv_slots.shape
    j = torch.arange(length, device=kv_slots.device)
    valid = j[None, :] < torch.tensor(kv_lens, device=kv_slots.device)[:, None]
    for bs in sizes:
        if num_slots % bs:
            continue
        first = kv_slots[:, ::bs]                                                # [B, nblocks] slot of row 0
        table = torch.div(first, bs, rounding_mode="floor")
        want = table.repeat_interleave(bs, 1)[:, :length] * bs + j % bs
        aligned = (first % bs == 0).repeat_interleave(bs, 1)[:, :length]
        if bool(((want == kv_slots) & aligned | ~valid).all()):
            return torch.where(valid[:, ::bs], table, 0).to(torch.int32), bs
    return None


def _platform(layer: Any) -> Any:
    if getattr(layer, "platform", None) is not None:
        return layer.platform
    from quantrt.platform import current_platform

    return current_platform()


def _served(layer: Any, q: torch.Tensor, fb: Any, sinks: torch.Tensor | None) -> tuple | None:
    """(ops, K pool, V pool) of this layer when the fused op serves it: an adapter is present, plain
    16-bit pages with V, no sinks, the layer's own head geometry; else None (SDPA)."""
    ops = npu_ops_of(_platform(layer))
    pool = fb.kv_pool
    if ops is None or sinks is not None or pool.quantized or not pool.has_v or q.dtype not in _HALF:
        return None
    k, v = pool.k[layer.layer_id], pool.v[layer.layer_id]
    d, hkv = q.shape[-1], layer.num_kv_heads
    if d != layer.head_dim or tuple(k.shape[1:]) != (hkv, d) or v.shape != k.shape or k.dtype != q.dtype:
        return None
    return ops, k, v


def npu_decode_attention(layer: Any, q: torch.Tensor, fb: Any, sinks: torch.Tensor | None = None
                         ) -> torch.Tensor | None:
    """PagedAttention's decode on Ascend: q [B, H, D] -> [B, H*D], or None when not served (then SDPA)."""
    served = _served(layer, q, fb, sinks)
    if served is None:
        return None
    ops, k, v = served
    b, h, d = q.shape
    hkv = layer.num_kv_heads
    lens = list(fb.kv_lens) if fb.kv_lens else [int(x) for x in fb.kv_lens_t.tolist()]
    key = ("npu_block_table", k.shape[0])
    if key not in fb.cache:                                      # once per step, shared by the layers
        fb.cache[key] = block_table(fb.kv_slots, lens, k.shape[0])
    if fb.cache[key] is None:
        return None
    table, bs = fb.cache[key]
    mask = None
    if layer.window is not None:
        allowed = fb.decode_mask(layer.window)                   # [B, 1, 1, L] True = may attend
        pad = table.shape[1] * bs - allowed.shape[-1]
        mask = torch.nn.functional.pad(~allowed, (0, pad), value=True)
    out, _ = ops.npu_fused_infer_attention_score(
        q.reshape(b, 1, h * d).contiguous(), k.view(-1, bs, hkv * d), v.view(-1, bs, hkv * d),
        atten_mask=mask, actual_seq_lengths_kv=lens, block_table=table, num_heads=h, num_key_value_heads=hkv,
        scale=layer.scale, input_layout="BSH", block_size=bs, sparse_mode=0)
    return out.reshape(b, h * d)


npu_decode_attention.runs_on_cpu = True  # type: ignore[attr-defined]  # device-agnostic: the adapter decides

CAUSAL_MASK_SIZE = 2048


def npu_extend_attention(layer: Any, q: torch.Tensor, fb: Any, sinks: torch.Tensor | None = None
                         ) -> torch.Tensor | None:
    """PagedAttention's extend (prefill, chunked prefill over a cached prefix) on Ascend: q [T, H, D] -> [T, H*D]
    through npu_fused_infer_attention_score with input_layout "TND" over the paged cache: actual_seq_lengths =
    cumulative q_lens, actual_seq_lengths_kv = kv_lens, sparse_mode 3 (right-down causal: the new tokens follow
    the prefix) or, with a sliding window W, sparse_mode 4 with pre_tokens W - 1, next_tokens 0; both take the
    compressed 2048x2048 upper-triangular mask. None (SDPA) for what the decode hook also declines."""
    served = _served(layer, q, fb, sinks)
    if served is None:
        return None
    ops, k, v = served
    t, h, d = q.shape
    hkv = layer.num_kv_heads
    key = ("npu_extend_table", k.shape[0])
    if key not in fb.cache:                                      # once per batch, shared by the layers
        slots = torch.zeros(len(fb.seq_slots), max(fb.kv_lens), dtype=torch.long, device=q.device)
        for b, s in enumerate(fb.seq_slots):
            slots[b, : s.numel()] = s
        mask = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=q.device).triu(1)
        fb.cache[key] = (block_table(slots, list(fb.kv_lens), k.shape[0]), mask)
    found, mask = fb.cache[key]
    if found is None:
        return None
    table, bs = found
    ends = torch.tensor(fb.q_lens).cumsum(0).tolist()
    window = layer.window
    out, _ = ops.npu_fused_infer_attention_score(
        q.contiguous(), k.view(-1, bs, hkv * d), v.view(-1, bs, hkv * d), atten_mask=mask,
        actual_seq_lengths=ends, actual_seq_lengths_kv=list(fb.kv_lens), block_table=table, num_heads=h,
        num_key_value_heads=hkv, scale=layer.scale, input_layout="TND", block_size=bs,
        sparse_mode=3 if window is None else 4, pre_tokens=2147483647 if window is None else window - 1,
        next_tokens=2147483647 if window is None else 0)
    return out.reshape(t, h * d)


npu_extend_attention.runs_on_cpu = True  # type: ignore[attr-defined]


class NpuTopK:
    """Platform.topk_op on Ascend: (logits [T, E], RoutingConfig, bias [E] | None) -> (weights [T, k] fp32,
    ids [T, k] int64) with select_experts' semantics."""

    name = "npu_moe_gating_top_k"

    def __init__(self, ops: NpuOps):
        self.ops = ops

    def __call__(self, logits: torch.Tensor, cfg: RoutingConfig, bias: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        from quantrt.layers.moe.routing import select_experts

        x = logits.float()
        if cfg.scoring == "softmax" and cfg.n_group == 1 and bias is None:
            w, ids, _ = self.ops.npu_moe_gating_top_k_softmax(x, None, k=cfg.top_k)
            w = w.float()
            if cfg.renormalize:
                w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
        elif cfg.renormalize and (bias is not None or cfg.n_group > 1):
            w, ids, _ = self.ops.npu_moe_gating_top_k(
                x, cfg.top_k, bias=None if bias is None else bias.float(), k_group=cfg.topk_group,
                group_count=cfg.n_group, group_select_mode=1 if bias is not None else 0, renorm=0,
                norm_type=0 if cfg.scoring == "softmax" else 1, out_flag=False, routed_scaling_factor=1.0)
            w = w.float()
        else:
            return select_experts(logits, cfg, bias)
        if cfg.routed_scaling_factor != 1.0:
            w = w * cfg.routed_scaling_factor
        return w, ids.long()


def npu_topk_op(platform: Any) -> NpuTopK | None:
    ops = npu_ops_of(platform)
    return NpuTopK(ops) if ops is not None else None
