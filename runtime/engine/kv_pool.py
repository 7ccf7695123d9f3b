"""The KV pool: per-layer K and V tensors indexed by slot, grouped into pages of `page_size` slots.

Slots are handed out a page at a time by the PageAllocator (engine/page_allocator.py); the pool only
stores and gathers. Storage dtype is the KV cache dtype (the compute dtype for `auto`).
"""

from __future__ import annotations

import torch


class KVPool:
    """k[l], v[l]: [num_slots, Hkv, D] for each layer l."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_slots = num_slots
        self.dtype = dtype
        self.k = [torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.v = [torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def write(self, i: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # slots: [T]; k, v: [T, Hkv, D]
        self.k[i].index_copy_(0, slots, k.to(self.dtype))
        self.v[i].index_copy_(0, slots, v.to(self.dtype))

    def read(self, pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        # slots: [L] or [B, L] -> [L, Hkv, D] or [B, L, Hkv, D]
        return pool[slots]
