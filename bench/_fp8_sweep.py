"""FP8 W8A8 per-token at batch 1-16 on the H100 (issue 6 item 1/4): the committed dispatch vs bf16 cuBLAS, the
per-token scale pass (one-step `row_scales` vs the old 1024-wide steps; the GEMV's in-kernel amax in 4096-wide vs
BK-wide steps), and 8192³ (one-launch quantization + cuBLASLt `_scaled_mm` vs `_scaled_mm` alone).

    python bench/_fp8_sweep.py --json out.json

Timed as the median CUDA-graph replay over weight copies that overflow the 50 MB L2 (the `bench/kernels.py`
method), after a relative-error check against fake-quantized activations @ the dequantized weight; bf16 cuBLAS
(`F.linear`) in the same run. The 8192³ rows are eager (`triton.testing.do_bench`, median): prefill is not
graph-captured. The first round of this pass (scales found inside the `swap_fp8` launch by ticketed writer
programs, and side-stream chunked quantization before `_scaled_mm`; both slower, dropped) is this file at
commit 1240f1d.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _sweep_common import Cells  # bench/ is sys.path[0]
from kernels import copies_for, time_us

FP8 = torch.float8_e4m3fn
REP_MS = 25  # CUDA-graph replay per cell (`kernels.time_us`)
SHAPES = [(8192, 8192), (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
MS = [1, 2, 4, 8, 16]
# SkinnyFp8Config (block_n, block_k, split_k, warps, stages, reduce, inline_amax, amax_block) at M = 1
SKINNY = {"inline4096": (16, 512, 0, 4, 1, 2, True, 4096), "inline_bk": (16, 512, 0, 4, 1, 2, True, 512),
          "launch": (16, 512, 0, 4, 1, 2, False, 4096)}
# SwapFp8Config (block_n, block_k, waves, warps, stages): the committed 8192² tile is (64, 256, 2, 4, 3)
SWAP_EXTRA = [(64, 256, 1, 4, 3), (64, 256, 2, 4, 4), (128, 256, 1, 8, 3)]


def _weights(kind: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    data = (torch.randn(n, k, device="cuda", generator=g) * 100).clamp(-448, 448).to(FP8)
    return data, torch.rand(n, device="cuda", generator=g) * 0.01


def _kernel_fns(k: int, n: int, act: str) -> list[Callable]:
    """TritonW8A8Kernel.apply (the dispatch as committed) over weight copies; act 'tok' or 'wonly'."""
    from quantrt.platform.interface import DeviceCapability
    from quantrt.platforms.cuda.kernels.w8a8 import TritonW8A8Kernel
    from quantrt.platforms.cuda.platform import CudaPlatform
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, ScaleGranularity

    plat = CudaPlatform(capability=DeviceCapability(9, 0))
    scheme = ActScheme(ActKind.DYNAMIC_TOKEN, FP8) if act == "tok" else ActScheme()
    kerns = []
    for i in range(copies_for(n * k)):
        data, sc = _weights("", n, k, i)
        kerns.append(TritonW8A8Kernel.prepare(LinearSpec(FloatWeight(data, sc, ScaleGranularity.CHANNEL), scheme,
                                                         torch.bfloat16), plat))
    return [lambda x, kk=kk: kk.apply(x, None) for kk in kerns]


def _call_skinny(cfg: tuple, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.platforms.cuda.kernels.skinny_fp8 import SkinnyFp8Config, skinny_fp8

    return skinny_fp8(x, wt[0], wt[1], 0, 1, 448.0, None, SkinnyFp8Config(*cfg))


def _call_swap(cfg: tuple, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.platforms.cuda.kernels.swap_fp8 import SwapFp8Config, swap_fp8

    return swap_fp8(x, wt[0], wt[1], 0, 1, 448.0, None, SwapFp8Config(*cfg))


def _ref_tok(x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.quant.quantize import quantize_act_per_token

    q, sx = quantize_act_per_token(x, FP8)
    return ((q.double() * sx.double()) @ (wt[0].double() * wt[1].double()[:, None]).t()).float()


def sweep(cells: Cells, out: str) -> None:
    for k, n in SHAPES:
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(2 * n * k))]
        fns = [lambda x, w=w: F.linear(x, w) for w in ws]
        xs = {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in MS}
        for m in MS:
            cells.timed("bf16", k, n, m, None, fns, xs[m])
        del ws, fns
        wts = [_weights("", n, k, j) for j in range(copies_for(n * k))]
        for act in ("tok",):
            fns = _kernel_fns(k, n, act)
            for m in MS:
                ref = _ref_tok(xs[m], wts[0]) if act == "tok" else None
                cells.timed(f"fp8_{act}_apply", k, n, m, None, fns, xs[m], ref)
            del fns
        if (k, n) == (8192, 8192):  # swap_fp8 tiles off the committed one (per token, separate scale launch)
            for m in (1, 16):
                ref = _ref_tok(xs[m], wts[0])
                for cfg in SWAP_EXTRA:
                    cells.timed("swap_tok", k, n, m, cfg, [lambda x, wt=wt, c=cfg: _call_swap(c, x, wt)
                                                           for wt in wts], xs[m], ref)
        if (k, n) in ((8192, 8192), (14336, 4096)):
            ref = _ref_tok(xs[1], wts[0])
            for name, cfg in SKINNY.items():
                cells.timed(f"skinny_{name}", k, n, 1, cfg, [lambda x, wt=wt, c=cfg: _call_skinny(c, x, wt)
                                                            for wt in wts], xs[1], ref)
        del wts
        torch.cuda.empty_cache()
        cells.save(out)


def scale_pass(cells: Cells) -> None:
    """The per-token scale launch alone: one-step default vs the old BLOCK 1024 / 4 warps."""
    from quantrt.platforms.cuda.kernels.skinny_fp8 import row_scales

    for k in (4096, 8192, 14336):
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for name, bw in (("row_scales_new", (None, None)), ("row_scales_old", (1024, 4))):
                cells.timed(name, k, 0, m, bw, [lambda x, bw=bw: row_scales(x, 448.0, *bw)], x)


def cube(n: int = 8192) -> list[dict]:
    """n³ eager: bf16, `_scaled_mm` on pre-quantized x (kernel only), one-launch quantize + `_scaled_mm`."""
    import triton.testing

    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows

    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    data, sc = _weights("", n, n)
    sb = sc.reshape(1, -1).contiguous()
    xq, sa = quant_rows(x, FP8, 448.0)

    def plain() -> torch.Tensor:
        q, s = quant_rows(x, FP8, 448.0)
        return torch._scaled_mm(q, data.t(), scale_a=s, scale_b=sb, out_dtype=torch.bfloat16)

    runs = {"bf16": lambda: F.linear(x, wb),
            "scaled_mm_only": lambda: torch._scaled_mm(xq, data.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
            "quant+scaled_mm": plain}
    rows = []
    for name, fn in runs.items():
        us = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3
        rows.append(dict(kind=name, us=us, tflops=2 * n**3 / us / 1e6))
        print(f"cube {name:16s} {us:8.1f} us {2 * n**3 / us / 1e6:6.0f} TFLOP/s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="fp8_sweep.json")
    ap.add_argument("--no-cube", action="store_true")
    a = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    t = time.time()
    cells = Cells(functools.partial(time_us, rep_ms=REP_MS))
    out = {}
    if not a.no_cube:
        out["cube"] = cube()
    try:
        scale_pass(cells)
        sweep(cells, a.json)
    finally:
        cells.save(a.json)
    cells.report()
    out["cells"] = cells.res
    with open(a.json, "w") as f:
        json.dump(out, f, indent=0)
    print(f"# done in {time.time() - t:.0f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
