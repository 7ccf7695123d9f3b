"""Tile sweep of the M <= 16 fp8 paths (`swap_fp8`, `skinny_fp8` with the in-kernel amax) and 8192³ fp8.

Run from bench/kernels.py (`--fp8-sweep out.json`, `--fp8-cube`). Triton variants are compiled first in
parallel worker processes (one call each fills the on-disk cache), then timed one by one here with
CUDA-graph replays over weight copies that overflow the L2 (`kernels.time_us`). Every timed variant is
checked against fake-quantized activations @ the dequantized weight first. Prints the best config per
(kernel, K, N, M) with its ratio to bf16 cuBLAS of the same run.
"""

from __future__ import annotations

import torch
from _sweep_common import Cells, precompile  # bench/ is sys.path[0]

SHAPES = [(8192, 8192), (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
MS = [1, 2, 4, 8, 16]
FP8 = torch.float8_e4m3fn
SWAP_CFGS = [  # (block_n, block_k, waves, warps, stages)
    (64, 256, 4, 4, 3), (32, 256, 4, 4, 3), (64, 128, 4, 4, 3), (128, 256, 4, 4, 3), (64, 512, 4, 4, 2),
    (32, 512, 4, 4, 2), (64, 256, 8, 4, 3), (64, 256, 2, 4, 3), (64, 256, 4, 8, 3), (16, 512, 4, 4, 3),
]
BLK_CFGS = [(64, 128, 4, 4, 3), (32, 128, 4, 4, 3), (64, 128, 8, 4, 3), (128, 128, 4, 4, 3)]
INLINE_CFGS = [(32, 256, 0, 4, 1, 2, True), (16, 512, 0, 4, 1, 2, True), (64, 256, 0, 4, 1, 2, True),
               (32, 512, 0, 4, 1, 2, True)]
# kind -> (configs, batch sizes, act code)
KINDS = {"swap_fp8_tok": (SWAP_CFGS, MS, 0), "swap_fp8_wonly": (SWAP_CFGS, MS, 3),
         "swap_fp8_blk": (BLK_CFGS, MS, 1), "skinny_fp8_inline": (INLINE_CFGS, [1, 2, 4], 0)}


def _weights(kind: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    data = (torch.randn(n, k, device="cuda", generator=g) * 100).clamp(-448, 448).to(FP8)
    if kind == "swap_fp8_blk":
        return data, torch.rand(n // 128, k // 128, device="cuda", generator=g) * 0.01
    return data, torch.rand(n, device="cuda", generator=g) * 0.01


def _call(kind: str, cfg: tuple, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.platforms.cuda.kernels.skinny_fp8 import SkinnyFp8Config, skinny_fp8
    from quantrt.platforms.cuda.kernels.swap_fp8 import SwapFp8Config, swap_fp8

    data, sc = wt
    act = KINDS[kind][2]
    qmax = 1.0 if act == 3 else 448.0
    if kind == "skinny_fp8_inline":
        return skinny_fp8(x, data, sc, act, 1, qmax, None, SkinnyFp8Config(*cfg))
    return swap_fp8(x, data, sc, act, 2 if act == 1 else 1, qmax, None, SwapFp8Config(*cfg))


def _reference(kind: str, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.quant.quantize import quantize_act_per_token, quantize_act_per_token_group

    data, sc = wt
    if kind == "swap_fp8_blk":
        w = data.float() * sc.repeat_interleave(128, 0).repeat_interleave(128, 1)
        q, sg = quantize_act_per_token_group(x, FP8, 128)
        return (q.float() * sg.repeat_interleave(128, 1)) @ w.t()
    w = data.float() * sc[:, None]
    if KINDS[kind][2] == 3:
        return x.float() @ w.t()
    q, sx = quantize_act_per_token(x, FP8)
    return (q.float() * sx) @ w.t()


def _variants() -> list[tuple]:
    """One compile per (kind, shape, config, M where M is a compile-time constant)."""
    out = []
    for k, n in SHAPES:
        for kind, (cfgs, ms, _) in KINDS.items():
            for cfg in cfgs:
                out += [(kind, k, n, m, cfg) for m in (ms if kind == "skinny_fp8_inline" else [16])]
    return out


def sweep(out: str) -> None:
    from kernels import build, copies_for, time_us  # bench/ is sys.path[0]

    precompile("_skinny_sweep", _variants(), workers=14)
    cells = Cells(time_us)
    for k, n in SHAPES:
        for name in ("bf16", "scaled_mm", "fp8_ch_tok", "fp8_blk_grp", "fp8_wonly"):
            fns = build(name, k, n)[0]
            for m in MS:
                cells.timed(name, k, n, m, None, fns, torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            del fns
        for kind, (cfgs, ms, _) in KINDS.items():
            ws = [_weights(kind, n, k, i) for i in range(copies_for(n * k))]
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = _reference(kind, x, ws[0])
                for cfg in cfgs:
                    cells.timed(kind, k, n, m, cfg,
                                [lambda x, wt=wt, c=cfg, kd=kind: _call(kd, c, x, wt) for wt in ws], x, ref)
            del ws
            torch.cuda.empty_cache()
        cells.save(out)
    cells.report()


def cube(n: int = 8192) -> None:
    """n³: bf16 cuBLAS, cuBLASLt fp8 rowwise on pre-quantized activations (kernel only), and
    TritonW8A8Kernel.apply per-channel x per-token (one-launch activation quantization + `_scaled_mm`)."""
    from kernels import PLATFORM, fp8_weight, time_us

    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import ActKind, ActScheme

    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    w = fp8_weight(n, n, "channel")
    xq, sa, sb = x.to(FP8), torch.ones(n, 1, device="cuda"), w.scale.reshape(1, -1).contiguous()
    kern = TritonW8A8Kernel.prepare(LinearSpec(w, ActScheme(ActKind.DYNAMIC_TOKEN, FP8), torch.bfloat16), PLATFORM)
    runs = {"bf16": lambda: torch.nn.functional.linear(x, wb),
            "scaled_mm": lambda: torch._scaled_mm(xq, w.data.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
            "fp8_ch_tok": lambda: kern.apply(x, None)}
    us = {name: time_us([fn]) for name, fn in runs.items()}
    print(f"| {n}³ | " + " | ".join(f"{name} {t:.0f} µs {2 * n**3 / t / 1e6:.0f} TFLOP/s" for name, t in us.items())
          + f" | fp8_ch_tok / scaled_mm {us['scaled_mm'] / us['fp8_ch_tok']:.2f}x |", flush=True)
