"""MoE layer throughput on CPU: the MoE kernel the platform selects vs the per-expert loop.

Dense experts: `grouped` (sort by expert + torch._grouped_mm) vs a transformers-style loop (one-hot
mask per expert). Quantized experts: the CPU MoE kernel selected for the scheme vs the per-expert loop
FusedMoE ran before (for every active expert: dequantize gate/up/down, two matmuls). MXFP4 rows use
quantize_mxfp4 experts (gpt-oss's format) with the same SwiGLU as the others.

    .venv/bin/python bench/moe.py [--experts 64 --top-k 8 --hidden 1024 --inter 512 --tokens 1,4,16,64,256]
                                  [--schemes dense,fp8-channel,...] [--reps 4] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from quantrt.layers.moe.experts import moe_reference
from quantrt.layers.moe.routing import RoutingConfig, select_experts
from quantrt.platforms.xpu.cpu_platform import CpuPlatform
from quantrt.quant.formats.mxfp4 import quantize_mxfp4
from quantrt.quant.moe_kernel import MoESpec, select_moe_kernel
from quantrt.quant.quantize import quantize_fp8
from quantrt.quant.weights import WEIGHT_ONLY, ActKind, ActScheme, DenseWeight, IntWeight


def rtn_int(w: torch.Tensor, bits: int, group: int, sym: bool) -> IntWeight:
    """Round-to-nearest integer quantization of w [N, K] (group = K: per channel)."""
    n, k = w.shape
    wg = w.float().view(n, k // group, group)
    if sym:
        s = wg.abs().amax(-1).clamp(min=1e-8) / (2 ** (bits - 1) - 1)
        q = (wg / s[..., None]).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return IntWeight(q.view(n, k).to(torch.int8), s, bits, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = (hi - lo).clamp(min=1e-8) / (2 ** bits - 1)
    z = (-lo / s).round()
    q = (wg / s[..., None] + z[..., None]).round().clamp(0, 2 ** bits - 1)
    return IntWeight(q.view(n, k).to(torch.uint8), s, bits, group, zero=z.to(torch.int32))


# name -> (weight maker, activation scheme, compute dtype)
SCHEMES = {
    "dense": (DenseWeight, WEIGHT_ONLY, torch.float32),
    "fp8-tensor": (lambda w: quantize_fp8(w, "tensor"), WEIGHT_ONLY, torch.float32),
    "fp8-channel-w8a8": (lambda w: quantize_fp8(w, "channel"),
                         ActScheme(ActKind.DYNAMIC_TOKEN, torch.float8_e4m3fn), torch.float32),
    "fp8-block": (lambda w: quantize_fp8(w, "block", (128, 128)),
                  ActScheme(ActKind.DYNAMIC_GROUP, torch.float8_e4m3fn, group=128), torch.float32),
    "fp8e5m2-channel": (lambda w: quantize_fp8(w, "channel", dtype=torch.float8_e5m2), WEIGHT_ONLY, torch.float32),
    "int8-channel-w8a8": (lambda w: rtn_int(w, 8, w.shape[1], True),
                          ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8), torch.float32),
    "int8-g128-sym": (lambda w: rtn_int(w, 8, 128, True), WEIGHT_ONLY, torch.float32),
    "int8-channel-bf16": (lambda w: rtn_int(w, 8, w.shape[1], True), WEIGHT_ONLY, torch.bfloat16),
    "int4-g128-asym": (lambda w: rtn_int(w, 4, 128, False), WEIGHT_ONLY, torch.float32),
    "int4-g128-asym-bf16": (lambda w: rtn_int(w, 4, 128, False), WEIGHT_ONLY, torch.bfloat16),
    "int4-g32-sym-bf16": (lambda w: rtn_int(w, 4, 32, True), WEIGHT_ONLY, torch.bfloat16),
    "mxfp4": (quantize_mxfp4, WEIGHT_ONLY, torch.float32),
    "mxfp4-bf16": (quantize_mxfp4, WEIGHT_ONLY, torch.bfloat16),
}


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


def interleaved_min(fns, reps: int) -> list[float]:
    """Seconds per call of each fn: calls alternate between the fns, each fn's fastest call counts
    (robust to the load of a shared box, where a mean mostly measures the other jobs)."""
    best = [float("inf")] * len(fns)
    for f in fns:
        f()
    for _ in range(reps):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--tokens", default="1,4,16,64,256")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--reps", type=int, default=4, help="alternating calls per side; the fastest counts")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    plat = CpuPlatform()
    e, h, i = a.experts, a.hidden, a.inter
    dense = [(torch.randn(i, h) * 0.02, torch.randn(i, h) * 0.02, torch.randn(h, i) * 0.02) for _ in range(e)]
    cfg = RoutingConfig(e, a.top_k)
    print(f"E={e} k={a.top_k} H={h} I={i}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| scheme | compute | tokens | kernel | kernel ms | per-expert loop ms | loop / kernel | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name in a.schemes.split(","):
            make, act, dt = SCHEMES[name]
            experts = tuple(tuple(make(w.to(dt) if make is DenseWeight else w) for w in ex) for ex in dense)
            spec = MoESpec(experts, tuple((act,) * 3 for _ in experts), h, i, dt)
            kernel = select_moe_kernel(spec, plat).kernel
            prepared = kernel.prepare(spec, plat)
            if make is DenseWeight:
                w13 = torch.stack([torch.cat([g.data, u.data]) for g, u, _ in experts])
                w2 = torch.stack([d.data for _, _, d in experts])

                def loop(x, w, ids, w13=w13, w2=w2):
                    return hf_style_loop(x, w.to(x.dtype), ids, w13, w2)
            else:
                def expert(n, experts=experts, dt=dt):
                    g, u, d = experts[n]
                    return torch.cat([g.dequantize(dt), u.dequantize(dt)]), d.dequantize(dt)

                def loop(x, w, ids, expert=expert):
                    return moe_reference(x, w.to(x.dtype), ids, e, expert)
            for t in (int(s) for s in a.tokens.split(",")):
                x = torch.randn(t, h).to(dt)
                w, ids = select_experts(torch.randn(t, e), cfg)
                tk, tl = interleaved_min([lambda x=x, w=w, ids=ids, p=prepared: p.apply(x, w, ids),
                                          lambda x=x, w=w, ids=ids: loop(x, w, ids)], a.reps)
                yk, yl = prepared.apply(x, w, ids).float(), loop(x, w, ids).float()
                rel = ((yk - yl).abs().max() / yl.abs().max()).item()
                print(f"| {name} | {str(dt).removeprefix('torch.')} | {t} | {kernel.name} | {tk * 1e3:.2f} | "
                      f"{tl * 1e3:.2f} | {tl / tk:.2f}x | {rel:.1e} |", flush=True)


if __name__ == "__main__":
    main()
