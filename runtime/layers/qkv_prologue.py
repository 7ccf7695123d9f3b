"""The layers' ops between a q/k/v projection and the rotary: + the projection's bias (Qwen2), then a per-head
RMSNorm of q and k (Qwen3, Gemma 3). At decode a platform's fused rotary + KV write + attention op may do them
in its own load of this token's q, k and v (`PagedAttention.takes_prologue`); the step then has no bias add and no
norm launches between the projection and the attention. Elsewhere `apply` runs the layers' own ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantrt.layers.norm import RMSNorm


@dataclass(frozen=True)
class QKVPrologue:
    """bias: the projection's bias split as (q [H*D], k [Hkv*D], v [Hkv*D]) (compute dtype), or None; q_norm /
    k_norm: the per-head norms over head_dim, or None (both or neither)."""

    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    q_norm: RMSNorm | None = None
    k_norm: RMSNorm | None = None

    def apply(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H, D], k, v [T, Hkv, D] (the projection's output without its bias) -> the rotary's input, as the
        unfused layer makes it: the bias added in the model dtype, then the norms."""
        if self.bias is not None:
            qb, kb, vb = self.bias
            q, k, v = q + qb.view(q.shape[1:]), k + kb.view(k.shape[1:]), v + vb.view(v.shape[1:])
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


__all__ = ["QKVPrologue"]
