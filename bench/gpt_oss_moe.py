"""gpt-oss MoE block throughput: MXFP4 experts (the platform's MoE kernel: the Triton fused MoE kernel
on CUDA, the reference elsewhere) vs the same weights dequantized to the compute dtype (grouped
torch._grouped_mm on CPU, the Triton fused MoE kernel on CUDA), with gpt-oss-20b's layer shape by default (H = I = 2880, 32 experts, top-4).

    python bench/gpt_oss_moe.py [--experts 32 --top-k 4 --hidden 2880 --inter 2880 --tokens 1,8,64]
                                [--dtype bfloat16] [--iters 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from quantrt.layers.moe.gpt_oss_block import GptOssMoE
from quantrt.platform import current_platform
from quantrt.quant.formats.mxfp4 import Mxfp4Format


def build(e: int, k: int, h: int, i: int, mxfp4: bool, dtype: torch.dtype, platform, seed: int = 0) -> GptOssMoE:
    """A block fed random checkpoint tensors: MXFP4 blocks/scales, or their exact dense dequantization."""
    g = torch.Generator().manual_seed(seed)
    fmt = Mxfp4Format() if mxfp4 else None
    block = GptOssMoE("m", h, i, e, k)
    for proj, (n, kk) in (("gate_up_proj", (2 * i, h)), ("down_proj", (h, i))):
        blocks = torch.randint(0, 256, (e, n, kk // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(118, 124, (e, n, kk // 32), dtype=torch.uint8, generator=g)
        if mxfp4:
            block.claim(f"m.experts.{proj}_blocks", blocks, fmt)
            block.claim(f"m.experts.{proj}_scales", scales, fmt)
        else:
            dense = torch.stack([w.dequantize() for w in Mxfp4Format().make_experts(
                proj, {"blocks": blocks, "scales": scales}, (e, n, kk))])
            block.claim(f"m.experts.{proj}", dense.transpose(1, 2).contiguous(), fmt)   # [E, K, N]
    block.claim("m.router.weight", torch.randn(e, h, generator=g) * 0.02, fmt)
    block.claim("m.router.bias", torch.zeros(e), fmt)
    block.claim("m.experts.gate_up_proj_bias", torch.randn(e, 2 * i, generator=g) * 0.01, fmt)
    block.claim("m.experts.down_proj_bias", torch.randn(e, h, generator=g) * 0.01, fmt)
    assert not block.missing()
    block.finish_loading(dtype, platform.device(), platform)
    return block


def timed(fn, iters: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2880)
    ap.add_argument("--inter", type=int, default=2880)
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    platform, dtype = current_platform(), getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if platform.device_type == "cuda" else (lambda: None)
    q = build(a.experts, a.top_k, a.hidden, a.inter, True, dtype, platform)
    d = build(a.experts, a.top_k, a.hidden, a.inter, False, dtype, platform)
    print(f"platform {platform.name}; mxfp4 experts: {q.impl} [{q.kernel_desc}]; dense: {d.impl}")
    expert_bytes = 3 * a.hidden * a.inter                                    # one expert's weights, elements
    print("| tokens | experts hit | mxfp4 us | dense us | mxfp4 / dense | mxfp4 GB/s (weights) | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for t in (int(s) for s in a.tokens.split(",")):
        x = (torch.randn(t, a.hidden, generator=torch.Generator().manual_seed(t)) * 0.5).to(platform.device(), dtype)
        hit = int(q.route(x)[1].unique().numel())
        tq = timed(lambda x=x: q(x), a.iters, sync)
        td = timed(lambda x=x: d(x), a.iters, sync)
        diff = float((q(x).float() - d(x).float()).abs().max())
        gbs = hit * expert_bytes * (0.5 + 1 / 32) / (tq * 1e-6) / 1e9       # fp4 codes + e8m0 bytes
        print(f"| {t} | {hit} | {tq:.0f} | {td:.0f} | {tq / td:.2f} | {gbs:.0f} | {diff:.3g} |")


if __name__ == "__main__":
    main()
