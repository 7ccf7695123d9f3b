"""MoE layer throughput on CPU: grouped (sort by expert + torch._grouped_mm) vs the reference
(loop over active experts) vs a transformers-style per-expert loop (one-hot mask per expert).

    .venv/bin/python bench/moe.py [--experts 64 --top-k 8 --hidden 1024 --inter 512 --dtype float32]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from quantrt.layers.moe.experts import moe_grouped, moe_reference
from quantrt.layers.moe.routing import RoutingConfig, select_experts


def hf_style_loop(x, weights, ids, w13, w2):
    """What transformers v5 does: one-hot mask, then for every hit expert: where, gather, 2 matmuls."""
    out = torch.zeros_like(x)
    mask = F.one_hot(ids, num_classes=w13.shape[0]).permute(2, 1, 0)      # [E, k, T]
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
        e = int(e[0])
        pos, tok = torch.where(mask[e])
        g, u = F.linear(x[tok], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(g) * u, w2[e]) * weights[tok, pos, None]
        out.index_add_(0, tok, y.to(x.dtype))
    return out


def timeit(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", default="1,8,64,512")
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    torch.manual_seed(0)
    w13 = torch.randn(a.experts, 2 * a.inter, a.hidden, dtype=dt) * 0.02
    w2 = torch.randn(a.experts, a.hidden, a.inter, dtype=dt) * 0.02
    cfg = RoutingConfig(a.experts, a.top_k)
    print(f"E={a.experts} k={a.top_k} H={a.hidden} I={a.inter} {a.dtype}, {torch.get_num_threads()} threads")
    print("| tokens | grouped ms | reference ms | HF-style loop ms | grouped vs loop | max |diff| |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for t in (int(s) for s in a.tokens.split(",")):
            x = torch.randn(t, a.hidden, dtype=dt)
            w, ids = select_experts(torch.randn(t, a.experts), cfg)
            w = w.to(dt)
            reps = max(2, min(50, 2000 // t))
            tg = timeit(lambda x=x, w=w, ids=ids: moe_grouped(x, w, ids, w13, w2), reps)
            tr = timeit(lambda x=x, w=w, ids=ids: moe_reference(x, w, ids, a.experts, lambda e: (w13[e], w2[e])), reps)
            tl = timeit(lambda x=x, w=w, ids=ids: hf_style_loop(x, w, ids, w13, w2), reps)
            diff = (moe_grouped(x, w, ids, w13, w2) - hf_style_loop(x, w, ids, w13, w2)).abs().max().item()
            print(f"| {t} | {tg * 1e3:.2f} | {tr * 1e3:.2f} | {tl * 1e3:.2f} | {tl / tg:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
