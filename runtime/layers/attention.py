"""Paged attention over a slot-indexed KV pool, computed with torch SDPA (fp32 softmax inside).

Each layer writes the new tokens' K/V into their slots, then reads every slot of each sequence.
Decode batches run as one padded SDPA call; extend (prefill) batches run one call per sequence with
a causal mask offset by the cached prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantrt.engine.forward_batch import ForwardBatch


class PagedAttention(nn.Module):
    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D] -> out: [T, H*D]
        k_pool, v_pool = fb.kv_pool.layer(self.layer_id)
        fb.kv_pool.write(self.layer_id, fb.out_slots, k, v)
        gqa = self.num_heads != self.num_kv_heads
        if fb.is_decode:
            kk = fb.kv_pool.read(k_pool, fb.kv_slots).transpose(1, 2)   # [B, Hkv, L, D]
            vv = fb.kv_pool.read(v_pool, fb.kv_slots).transpose(1, 2)
            qq = q.unsqueeze(2)                                          # [B, H, 1, D]
            mask = fb.decode_mask(self.window)                           # [B, 1, 1, L] bool
            o = F.scaled_dot_product_attention(qq, kk.to(q.dtype), vv.to(q.dtype), attn_mask=mask,
                                               scale=self.scale, enable_gqa=gqa)
            return o.reshape(q.shape[0], -1)
        outs = []
        start = 0
        for i, n in enumerate(fb.q_lens):
            slots = fb.seq_slots[i]                                      # [L]
            kk = fb.kv_pool.read(k_pool, slots).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            vv = fb.kv_pool.read(v_pool, slots).transpose(0, 1).unsqueeze(0)
            qq = q[start:start + n].transpose(0, 1).unsqueeze(0)         # [1, H, n, D]
            mask = fb.extend_mask(i, self.window)                        # [n, L] bool or None (causal)
            o = F.scaled_dot_product_attention(qq, kk.to(q.dtype), vv.to(q.dtype), attn_mask=mask,
                                               is_causal=mask is None, scale=self.scale, enable_gqa=gqa)
            outs.append(o.squeeze(0).transpose(0, 1).reshape(n, -1))
            start += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]
