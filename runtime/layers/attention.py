"""Paged attention over a slot-indexed KV pool, computed with torch SDPA.

Each layer writes the new tokens' K/V into their slots, then reads every slot of each sequence.
Decode batches run as one padded SDPA call; extend (prefill) batches run one call per sequence with
a causal mask offset by the cached prefix.

Quantized caches (fp8/fp4) are the reference path: pages are dequantized to fp32 (times k_scale /
v_scale) and attention runs with fp32 q, k, v, so QK^T, the softmax and P.V all accumulate in fp32
(the two-level accumulation lesson of ANCHORS.md: never accumulate P.V in the storage precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantrt.engine.forward_batch import ForwardBatch


class PagedAttention(nn.Module):
    """k_scale / v_scale: per-tensor KV scales of this layer (1.0 unless the checkpoint gives them)."""

    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.window = sliding_window
        self.k_scale = 1.0
        self.v_scale = 1.0

    def set_kv_scale(self, which: str, value: float) -> None:
        """which: "k" or "v"; -1 (the 'not calibrated' sentinel) means 1.0."""
        setattr(self, f"{which}_scale", 1.0 if value == -1.0 else float(value))

    def _kv(self, fb: ForwardBatch, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fb.kv_pool.gather(self.layer_id, slots, self.k_scale, self.v_scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D] -> out: [T, H*D]
        pool = fb.kv_pool
        pool.write(self.layer_id, fb.out_slots, k, v, self.k_scale, self.v_scale)
        gqa = self.num_heads != self.num_kv_heads
        cdt = torch.float32 if pool.quantized else q.dtype             # fp32 math over quantized pages
        if fb.is_decode:
            kk, vv = self._kv(fb, fb.kv_slots)                           # [B, L, Hkv, D]
            qq = q.unsqueeze(2).to(cdt)                                  # [B, H, 1, D]
            mask = fb.decode_mask(self.window)                           # [B, 1, 1, L] bool
            o = F.scaled_dot_product_attention(qq, kk.transpose(1, 2).to(cdt), vv.transpose(1, 2).to(cdt),
                                               attn_mask=mask, scale=self.scale, enable_gqa=gqa)
            return o.reshape(q.shape[0], -1).to(q.dtype)
        outs = []
        start = 0
        for i, n in enumerate(fb.q_lens):
            kk, vv = self._kv(fb, fb.seq_slots[i])                       # [L, Hkv, D]
            kk = kk.transpose(0, 1).unsqueeze(0).to(cdt)                 # [1, Hkv, L, D]
            vv = vv.transpose(0, 1).unsqueeze(0).to(cdt)
            qq = q[start:start + n].transpose(0, 1).unsqueeze(0).to(cdt)  # [1, H, n, D]
            mask = fb.extend_mask(i, self.window)                        # [n, L] bool or None (causal)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=mask is None,
                                               scale=self.scale, enable_gqa=gqa)
            outs.append(o.squeeze(0).transpose(0, 1).reshape(n, -1).to(q.dtype))
            start += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]
