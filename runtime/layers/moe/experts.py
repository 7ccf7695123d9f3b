"""Expert math for y = sum_j w[t, j] * down_e(act(gate_e(x)) * up_e(x)), e = ids[t, j].

Two implementations with the same contract:
- `moe_reference`: a loop over the experts that received tokens; each expert's weights come from a
  callable, so quantized experts (any canonical scheme) dequantize there. Runs everywhere.
- `moe_grouped`: tokens sorted by expert, one gather, one `torch._grouped_mm` per projection over
  stacked dense weights, one index_add. No per-expert Python work (CPU and any torch device).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Act = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (gate, up) -> hidden


def silu_and_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def moe_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                  expert: Callable[[int], tuple[torch.Tensor, torch.Tensor]], act: Act = silu_and_mul
                  ) -> torch.Tensor:
    """x: [T, H]; weights, ids: [T, k]; expert(e) -> (w13 [2I, H], w2 [H, I]) -> [T, H]."""
    out = torch.zeros_like(x)
    flat = ids.flatten()                                                  # [T*k]
    hit = torch.bincount(flat, minlength=num_experts).nonzero().flatten().tolist()
    for e in hit:
        pos = (flat == e).nonzero().flatten()                             # [n] positions in T*k
        tok = pos // ids.shape[1]
        w13, w2 = expert(e)
        g, u = F.linear(x[tok], w13).chunk(2, dim=-1)                     # [n, I] each
        y = F.linear(act(g, u), w2)                                       # [n, H]
        out.index_add_(0, tok, y * weights.flatten()[pos, None].to(y.dtype))
    return out


def moe_grouped(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, act: Act = silu_and_mul) -> torch.Tensor:
    """x: [T, H]; weights, ids: [T, k]; w13: [E, 2I, H]; w2: [E, H, I] -> [T, H]."""
    k = ids.shape[1]
    flat = ids.flatten()
    order = flat.argsort(stable=True)                                     # [T*k] sorted by expert
    tok = order // k
    offs = torch.bincount(flat, minlength=w13.shape[0]).cumsum(0).to(torch.int32)   # [E] group ends
    xs = x[tok]                                                           # [T*k, H]
    g, u = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)   # [T*k, I] each
    y = torch._grouped_mm(act(g, u), w2.transpose(1, 2), offs=offs)       # [T*k, H]
    y = y * weights.flatten()[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tok, y)
