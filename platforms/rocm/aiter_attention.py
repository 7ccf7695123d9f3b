"""ROCm paged decode attention through aiter's paged_attention_rocm (SGLANG_USE_AITER=1 / QUANTRT_USE_AITER=1),
EMULATED in CI (platforms/rocm/emulation.py). `aiter_decode_attention` is the ROCm platforms'
`Platform.decode_attention_ref`; without the aiter switch it is the CUDA platform's Triton kernel.

aiter reads vLLM's ROCm paged KV layout, not our slot-indexed pool [slots, Hkv, D]:
  key_cache   [num_blocks, Hkv, D/x, block_size, x]   x = 16 bytes / element size (8 for bf16/fp16, 16 for fp8)
  value_cache [num_blocks, Hkv, D, block_size]
so each call converts the blocks the batch references (a copy proportional to the batch's KV, not the pool:
a pool kept natively in this layout is future work). The block table is read off the slot table (the pool is
paged already, quantrt.platforms.ascend.attention.block_table) with block sizes 32 / 16, the ones the kernel
takes. Served: bf16/fp16 pages ("auto") and fp8 pages in the platform's fp8 (e4m3fnuz on MI300) with the
layer's k_scale / v_scale ("fp8"); head_dim 64/128, GQA ratio <= 16, no sliding window, no sinks, KV length
<= 32768. Anything else returns None and PagedAttention runs SDPA.
"""

from __future__ import annotations

from typing import Any

import torch

from quantrt.engine.kv_quant import KVKind
from quantrt.platforms.ascend.attention import block_table
from quantrt.platforms.rocm.aiter_adapter import aiter_ops_of

PARTITION_SIZE = 256
HEAD_SIZES = (64, 128)
BLOCK_SIZES = (32, 16)
MAX_SEQ_LEN = 32768


def to_aiter_kv_cache(k: torch.Tensor, v: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool rows k, v [num_slots, Hkv, D] (slots block-major) -> aiter key_cache [nb, Hkv, D/x, bs, x] and
    value_cache [nb, Hkv, D, bs] (x = 16 bytes / element size)."""
    n, hkv, d = k.shape
    x = 16 // k.element_size()
    kb = k.view(n // block_size, block_size, hkv, d // x, x).permute(0, 2, 3, 1, 4).contiguous()
    vb = v.view(n // block_size, block_size, hkv, d).permute(0, 2, 3, 1).contiguous()
    return kb, vb


def _platform(layer: Any) -> Any:
    if getattr(layer, "platform", None) is not None:
        return layer.platform
    from quantrt.platform import current_platform

    return current_platform()


def aiter_decode_attention(layer: Any, q: torch.Tensor, fb: Any, sinks: torch.Tensor | None = None
                           ) -> torch.Tensor | None:
    """PagedAttention's decode on ROCm: aiter's paged_attention_rocm when aiter is on and serves the layer, else
    the Triton kernel of platforms/cuda (on the GPU); q [B, H, D] -> [B, H*D] or None (SDPA). While a decode
    graph is captured the Triton kernel runs (the aiter path reads the slot table on the host)."""
    platform = _platform(layer)
    ops = aiter_ops_of(platform)
    capturing = q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    o = _aiter(ops, platform, layer, q, fb, sinks) if ops is not None and not capturing else None
    if o is not None or q.device.type == "cpu":
        return o
    from quantrt.platforms.cuda.kernels.decode_attention_op import decode_attention

    return decode_attention(layer, q, fb, sinks)


def _aiter(ops: Any, platform: Any, layer: Any, q: torch.Tensor, fb: Any, sinks: torch.Tensor | None
           ) -> torch.Tensor | None:
    pool = fb.kv_pool
    i = layer.layer_id
    b, h, d = q.shape
    hkv = layer.num_kv_heads
    kind = pool.spec.kind
    fp8 = kind is KVKind.FP8
    if (sinks is not None or layer.window is not None or not pool.has_v or q.dtype not in (torch.float16, torch.bfloat16)
            or d != layer.head_dim or d not in HEAD_SIZES or h % hkv or h // hkv > 16
            or kind is KVKind.FP4 or (fp8 and pool.spec.dtype != platform.fp8_dtype())
            or (not fp8 and pool.k[i].dtype != q.dtype) or tuple(pool.k[i].shape[1:]) != (hkv, d)):
        return None
    lens = list(fb.kv_lens) if fb.kv_lens else [int(x) for x in fb.kv_lens_t.tolist()]
    if max(lens) > MAX_SEQ_LEN:
        return None
    key = ("aiter_block_table", pool.k[i].shape[0])
    if key not in fb.cache:                                       # once per step, shared by the layers
        found = block_table(fb.kv_slots, lens, pool.k[i].shape[0], BLOCK_SIZES)
        if found is not None:                                     # only the referenced blocks are converted
            table, bs = found
            nblk = torch.tensor([-(-n // bs) for n in lens], device=table.device)
            used_mask = torch.arange(table.shape[1], device=table.device)[None, :] < nblk[:, None]
            used = torch.unique(table[used_mask].long())
            remap = torch.zeros(pool.k[i].shape[0] // bs, dtype=torch.int32, device=table.device)
            remap[used] = torch.arange(used.numel(), dtype=torch.int32, device=table.device)
            found = (torch.where(used_mask, remap[table.long()], 0).to(torch.int32), bs, used)
        fb.cache[key] = found
    if fb.cache[key] is None:
        return None
    table, bs, used = fb.cache[key]
    rows = (used[:, None] * bs + torch.arange(bs, device=used.device)).flatten()
    key_cache, value_cache = to_aiter_kv_cache(pool.k[i][rows], pool.v[i][rows], bs)
    parts = -(-max(lens) // PARTITION_SIZE)
    out = torch.empty_like(q)
    exp_sums = torch.empty(b, h, parts, dtype=torch.float32, device=q.device)
    max_logits = torch.empty_like(exp_sums)
    tmp_out = torch.empty(b, h, parts, d, dtype=q.dtype, device=q.device)
    scales = [torch.tensor([s if fp8 else 1.0], dtype=torch.float32, device=q.device)
              for s in (layer.k_scale, layer.v_scale)]
    ops.paged_attention_rocm(out, exp_sums, max_logits, tmp_out, q.contiguous(), key_cache, value_cache, hkv,
                             layer.scale, table, torch.tensor(lens, dtype=torch.int32, device=q.device), bs,
                             max(lens), None, "fp8" if fp8 else "auto", scales[0], scales[1], None,
                             PARTITION_SIZE)
    return out.reshape(b, h * d)


aiter_decode_attention.runs_on_cpu = True  # type: ignore[attr-defined]  # the emulated MI300 computes on CPU
