"""Tile sweeps of the M <= 16 fp8 paths (`swap_fp8`, `skinny_fp8` with the in-kernel amax), 8192³ fp8, and
the W4A16 GEMV (`skinny_wna16`) at M = 1-4 against `tc_wna16`, tinygemm and bf16 cuBLAS.

Run from bench/kernels.py (`--fp8-sweep out.json`, `--fp8-cube`), or `python bench/_skinny_sweep.py --w4 out.json`. Triton variants are compiled first in
parallel worker processes (one call each fills the on-disk cache), then timed one by one here with
CUDA-graph replays over weight copies that overflow the L2 (`kernels.time_us`). Every timed variant is
checked against fake-quantized activations @ the dequantized weight first. Prints the best config per
(kernel, K, N, M) with its ratio to bf16 cuBLAS of the same run.
"""

from __future__ import annotations

import sys

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


def _weights(kind: str, n: int, k: int, seed: int = 0) -> tuple:
    if kind in W4_KINDS:
        return _w4_weights(n, k, seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    data = (torch.randn(n, k, device="cuda", generator=g) * 100).clamp(-448, 448).to(FP8)
    if kind == "swap_fp8_blk":
        return data, torch.rand(n // 128, k // 128, device="cuda", generator=g) * 0.01
    return data, torch.rand(n, device="cuda", generator=g) * 0.01


def _call(kind: str, cfg: tuple, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.platforms.cuda.kernels.skinny_fp8 import SkinnyFp8Config, skinny_fp8
    from quantrt.platforms.cuda.kernels.swap_fp8 import SwapFp8Config, swap_fp8

    if kind in W4_KINDS:
        return _w4_call(kind, cfg, x, wt)
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
        cells.baselines(build, ("bf16", "scaled_mm", "fp8_ch_tok", "fp8_blk_grp", "fp8_wonly"), k, n, MS)
        for kind, (cfgs, ms, _) in KINDS.items():
            cells.configs(sys.modules[__name__], kind, k, n, ms, cfgs, copies_for(n * k))
        cells.save(out)
    cells.report()


def cube(n: int = 8192) -> None:
    """n³: bf16 cuBLAS, cuBLASLt fp8 rowwise on pre-quantized activations (kernel only), and
    TritonW8A8Kernel.apply per-channel x per-token (one-launch activation quantization + `_scaled_mm`).
    Then the linear as the model runs it behind its fused add + RMSNorm: the norm writes the linear's codes
    (`row_codes`) instead of its bf16 output; the linear's cost there is (norm -> codes + apply) - (plain norm),
    set against `_scaled_mm` alone."""
    from kernels import PLATFORM, fp8_weight, time_us

    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.platforms.cuda.layer_ops import triton_add_rms_norm
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import ActKind, ActScheme

    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    delta = torch.randn_like(x)
    wn = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    wb = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    w = fp8_weight(n, n, "channel")
    xq, sa, sb = x.to(FP8), torch.ones(n, 1, device="cuda"), w.scale.reshape(1, -1).contiguous()
    kern = TritonW8A8Kernel.prepare(LinearSpec(w, ActScheme(ActKind.DYNAMIC_TOKEN, FP8), torch.bfloat16), PLATFORM)
    codes = kern.row_codes(n)
    runs = {"bf16": lambda: torch.nn.functional.linear(x, wb),
            "scaled_mm": lambda: torch._scaled_mm(xq, w.data.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
            "fp8_ch_tok": lambda: kern.apply(x, None),
            "norm": lambda: triton_add_rms_norm(x, delta, wn, 1e-5),
            "norm+fp8": lambda: kern.apply(triton_add_rms_norm(x, delta, wn, 1e-5)[0], None)}
    if codes is not None:
        runs["norm_codes+fp8"] = lambda: kern.apply(triton_add_rms_norm(x, delta, wn, 1e-5, codes)[0], None)
    us = {name: time_us([fn]) for name, fn in runs.items()}
    print(f"| {n}³ | " + " | ".join(f"{name} {t:.0f} µs {2 * n**3 / t / 1e6:.0f} TFLOP/s" for name, t in us.items())
          + f" | fp8_ch_tok / scaled_mm {us['scaled_mm'] / us['fp8_ch_tok']:.2f}x |", flush=True)
    if codes is None:
        print(f"# the fp8 kernel at M={n} takes no codes from the norm (row_codes None)", flush=True)
        return
    lin = us["norm_codes+fp8"] - us["norm"]
    print(f"| {n}³ behind add + RMSNorm | norm {us['norm']:.0f} µs | norm + quantize + fp8 {us['norm+fp8']:.0f} µs"
          f" | norm -> codes + fp8 {us['norm_codes+fp8']:.0f} µs | linear's share {lin:.0f} µs | scaled_mm / share "
          f"{us['scaled_mm'] / lin:.2f}x (with the quantize launch: "
          f"{us['scaled_mm'] / (us['norm+fp8'] - us['norm']):.2f}x) |", flush=True)


# ---- W4A16 GEMV (skinny_wna16) at M = 1-4: g128 symmetric codes, the benchmark's weight
W4_KINDS = ("w4_gemv", "w4_tc")
W4_SHAPES = [(8192, 8192), (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
# (block_n, block_k, split_k, num_warps, num_stages, reduce, waves, prefetch)
W4_CFGS = [
    (1024, 32, 0, 4, 1, 2, 2, True), (1024, 32, 0, 4, 1, 2, 3, True), (1024, 32, 0, 4, 1, 2, 1, True),
    (1024, 32, 0, 4, 1, 2, 2, False), (1024, 64, 0, 4, 1, 2, 2, True), (512, 32, 0, 4, 1, 2, 2, True),
    (512, 64, 0, 4, 1, 2, 3, True), (512, 32, 0, 2, 1, 2, 4, True), (256, 32, 0, 1, 1, 2, 8, True),
    (2048, 16, 0, 4, 1, 2, 2, True), (1024, 32, 0, 8, 1, 2, 2, True), (1024, 32, 0, 4, 1, 2, 4, True),
]
W4_MS = [1, 2, 3, 4]


def _w4_weights(n: int, k: int, seed: int = 0) -> tuple:
    """(kernel, w) for a random symmetric 4-bit g128 weight, prepared the way `apply` uses it."""
    from kernels import PLATFORM, int_weight

    from quantrt.platforms.cuda.kernels import TritonWNA16Kernel
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import ActScheme

    torch.manual_seed(seed)
    w = int_weight(n, k, 4, 128)
    return TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.bfloat16), PLATFORM), w


def _w4_call(kind: str, cfg: tuple | None, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.platforms.cuda.kernels.skinny_wna16 import SkinnyConfig, skinny_wna16
    from quantrt.platforms.cuda.kernels.tc_wna16 import tc_wna16

    kern = wt[0]
    if kind == "w4_tc":
        return tc_wna16(x, kern.packed, kern.scale, kern.zero, 128, zero_const=kern.zero_const)
    return skinny_wna16(x, kern.packed, kern.scale, None, 128, 4, SkinnyConfig(*cfg) if cfg else None,
                        zero_const=kern.zero_const)


def _w4_variants(cfgs: list[tuple], shapes: list[tuple[int, int]], ms: list[int]) -> list[tuple]:
    return [("w4_gemv", k, n, m, cfg) for k, n in shapes for m in ms for cfg in cfgs]


def w4_sweep(out: str, cfgs: list[tuple] | None = None, shapes: list[tuple[int, int]] | None = None,
             ms: list[int] | None = None) -> None:
    """bf16 cuBLAS, tinygemm, `apply` (what serving dispatches), `tc_wna16` (M >= 2) and every GEMV config,
    each checked against x.float() @ the float64-dequantized weight before it is timed."""
    from kernels import build, copies_for, time_us

    cfgs, shapes, ms = cfgs or W4_CFGS, shapes or W4_SHAPES, ms or W4_MS
    precompile("_skinny_sweep", _w4_variants(cfgs, shapes, ms), workers=14)
    cells = Cells(time_us)
    for k, n in shapes:
        cells.baselines(build, ("bf16", "tinygemm"), k, n, ms)
        wts = [_w4_weights(n, k, i) for i in range(copies_for(n * k // 2))]
        wdeq = wts[0][1].dequantize().double()
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = (x.double() @ wdeq.t()).float()
            cells.timed("apply", k, n, m, None, [lambda x, kk=wt[0]: kk.apply(x, None) for wt in wts], x, ref)
            if m > 1:
                cells.timed("w4_tc", k, n, m, None, [lambda x, wt=wt: _w4_call("w4_tc", None, x, wt) for wt in wts],
                            x, ref)
            for cfg in cfgs:
                cells.timed("w4_gemv", k, n, m, cfg,
                            [lambda x, wt=wt, c=cfg: _w4_call("w4_gemv", c, x, wt) for wt in wts], x, ref)
        del wts
        torch.cuda.empty_cache()
        cells.save(out)
    cells.report()


if __name__ == "__main__":
    import argparse
    import ast

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--w4", required=True, help="JSON file for the W4A16 GEMV sweep cells")
    ap.add_argument("--cfgs", default=None, help="python list of config tuples (default W4_CFGS)")
    ap.add_argument("--shapes", default=None, help="python list of (K, N) (default: the five Llama shapes)")
    ap.add_argument("--ms", default=None, help="python list of batch rows (default 1-4)")
    a = ap.parse_args()
    lit = lambda s: ast.literal_eval(s) if s else None  # noqa: E731
    w4_sweep(a.w4, lit(a.cfgs), lit(a.shapes), lit(a.ms))
