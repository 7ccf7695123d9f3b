"""ForwardBatch: everything one model forward needs to know about the tokens it processes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantrt.engine.kv_pool import KVPool


@dataclass
class ForwardBatch:
    """A batch of sequences, each contributing q_lens[i] new tokens after kv_lens[i]-q_lens[i] cached ones.

    input_ids/positions/out_slots: [T] (T = sum q_lens). seq_slots[i]: [kv_lens[i]] KV slots of seq i.
    logits_rows: [S] rows of the hidden states whose logits are wanted.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    out_slots: torch.Tensor
    q_lens: list[int]
    kv_lens: list[int]
    seq_slots: list[torch.Tensor]
    logits_rows: torch.Tensor
    kv_pool: KVPool
    is_decode: bool
    kv_slots: torch.Tensor | None = None          # decode only: [B, Lmax] padded slot table
    kv_lens_t: torch.Tensor | None = None         # decode only: [B] int64 kv_lens on the device (graphs)
    cache: dict = field(default_factory=dict)     # per-batch values shared by layers (masks, rope)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, 1, Lmax] bool: True where a decode query may attend."""
        key = ("d", window)
        if key not in self.cache:
            lmax, dev = self.kv_slots.shape[1], self.kv_slots.device
            kv = (self.kv_lens_t if self.kv_lens_t is not None else torch.tensor(self.kv_lens, device=dev))[:, None]
            j = torch.arange(lmax, device=dev)[None, :]
            m = j < kv
            if window is not None:
                m &= j > kv - 1 - window
            self.cache[key] = m[:, None, None, :]
        return self.cache[key]

    def extend_mask(self, i: int, window: int | None) -> torch.Tensor | None:
        """[n, L] bool for sequence i, or None when a plain causal mask is exact."""
        n, total = self.q_lens[i], self.kv_lens[i]
        prefix = total - n
        if prefix == 0 and (window is None or window >= total):
            return None
        key = ("e", i, window)
        if key not in self.cache:
            dev = self.input_ids.device
            qpos = torch.arange(prefix, total, device=dev)[:, None]
            kpos = torch.arange(total, device=dev)[None, :]
            m = kpos <= qpos
            if window is not None:
                m &= kpos > qpos - window
            self.cache[key] = m
        return self.cache[key]
