"""FP8 W8A8 per-token sweep on the H100 (issue 6 item 1/4): scales fused into `swap_fp8` / the M = 1 GEMV at
batch 1-32, and the chunked side-stream quantization in front of `_scaled_mm` at 8192³.

    python bench/_fp8_sweep.py --json out.json [--quick]

Every Triton variant is compiled first in parallel workers (`_sweep_common.precompile`), then timed one by
one as the median CUDA-graph replay over weight copies that overflow the 50 MB L2, after a relative-error
check against fake-quantized activations @ the dequantized weight. Cells: µs, speed-up over bf16 cuBLAS
(`F.linear`) of the same run, % of the 3.0 TB/s copy ceiling for the weight + activation + output bytes.
The 8192³ rows are eager (`triton.testing.do_bench`, median): prefill is not graph-captured.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _sweep_common import Cells, precompile  # bench/ is sys.path[0]

FP8 = torch.float8_e4m3fn
L2_BYTES = 50 * 2**20
COPY = 3.0e12
SHAPES = [(8192, 8192), (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
# SwapFp8Config: (block_n, block_k, waves, warps, stages, block_m, fused_scale, scale_kw)
SWAP = [(64, 256, 2, 4, 3, 16, True, 512), (64, 256, 4, 4, 3, 16, True, 512), (64, 256, 2, 4, 4, 16, True, 512),
        (64, 512, 2, 4, 3, 16, True, 512), (128, 256, 2, 4, 3, 16, True, 512), (128, 256, 2, 8, 3, 16, True, 512),
        (64, 128, 4, 4, 4, 16, True, 512), (32, 256, 4, 4, 3, 16, True, 512), (64, 256, 1, 4, 3, 16, True, 512),
        (64, 256, 2, 4, 3, 16, True, 1024), (64, 256, 2, 4, 3, 16, True, 256), (128, 128, 2, 4, 4, 16, True, 512)]
SWAP_OFF = [(64, 256, 2, 4, 3, 16, False, 512)]          # the separate scale launch (before)
SWAP_STATIC = [(64, 256, 2, 4, 3, 16, True, 512)]        # static per-tensor scale: no scale work at all (floor)
# SkinnyFp8Config: (block_n, block_k, split_k, warps, stages, reduce, inline_amax)
SKINNY = [(16, 512, 0, 4, 1, 2, True), (16, 512, 0, 4, 2, 2, True), (32, 512, 0, 4, 1, 2, True),
          (16, 1024, 0, 4, 1, 2, True), (16, 512, 0, 8, 1, 2, True), (32, 256, 0, 4, 2, 2, True),
          (16, 512, 1, 4, 1, 0, True), (16, 512, 4, 4, 1, 2, True), (16, 512, 0, 4, 1, 2, False)]
KINDS = {"swap_tok": (SWAP, 0), "swap_tok_off": (SWAP_OFF, 0), "swap_static": (SWAP_STATIC, 2),
         "skinny_tok": (SKINNY, 0)}


def copies_for(nbytes: int) -> int:
    return max(1, min(16, math.ceil(4 * L2_BYTES / nbytes)))


def time_us(fns: list[Callable[[], object]]) -> float:
    """Median µs of one call, over a CUDA graph that calls every fn (one per weight copy) once."""
    import triton.testing

    def run() -> None:
        for f in fns:
            f()

    return triton.testing.do_bench_cudagraph(run, rep=25, return_mode="median") * 1e3 / len(fns)


def _weights(kind: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    data = (torch.randn(n, k, device="cuda", generator=g) * 100).clamp(-448, 448).to(FP8)
    return data, torch.rand(n, device="cuda", generator=g) * 0.01


_STATIC = {}


def _call(kind: str, cfg: tuple, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.platforms.cuda.kernels.skinny_fp8 import SkinnyFp8Config, skinny_fp8
    from quantrt.platforms.cuda.kernels.swap_fp8 import SwapFp8Config, swap_fp8

    data, sc = wt
    if kind == "skinny_tok":
        return skinny_fp8(x, data, sc, 0, 1, 448.0, None, SkinnyFp8Config(*cfg))
    act = KINDS[kind][1]
    sa = None
    if act == 2:
        sa = _STATIC.setdefault(x.device, torch.full((1,), 0.01, device=x.device))
    return swap_fp8(x, data, sc, act, 1, 448.0, sa, SwapFp8Config(*cfg))


def _reference(kind: str, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.quant.quantize import quantize_act_per_token

    data, sc = wt
    w = data.double() * sc.double()[:, None]
    if KINDS[kind][1] == 2:
        q = (x.float() / 0.01).clamp(-448, 448).to(FP8)
        return ((q.double() * 0.01) @ w.t()).float()
    q, sx = quantize_act_per_token(x, FP8)
    return ((q.double() * sx.double()) @ w.t()).float()


def _configs(kind: str, first: bool) -> list[tuple]:
    """The config sweep at the first shape; elsewhere four swap tiles and the committed GEMV tile."""
    cfgs = KINDS[kind][0]
    if first:
        return cfgs
    return [SWAP[i] for i in (0, 1, 2, 6)] if kind == "swap_tok" else cfgs[:1]


def _variants(shapes: list[tuple[int, int]]) -> list[tuple]:
    return [(kind, k, n, 1 if kind == "skinny_tok" else 16, cfg)
            for i, (k, n) in enumerate(shapes) for kind in KINDS for cfg in _configs(kind, i == 0)]


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


def sweep(cells: Cells, shapes: list[tuple[int, int]], ms: list[int], out: str) -> None:
    for i, (k, n) in enumerate(shapes):
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(2 * n * k))]
        fns = [lambda x, w=w: F.linear(x, w) for w in ws]
        for m in ms:
            cells.timed("bf16", k, n, m, None, fns, torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        del ws, fns
        for act in ("tok", "wonly"):
            fns = _kernel_fns(k, n, act)
            for m in ms:
                cells.timed(f"fp8_{act}_apply", k, n, m, None, fns, torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            del fns
        wts = [_weights("", n, k, j) for j in range(copies_for(n * k))]
        for kind in KINDS:
            for m in ([1] if kind == "skinny_tok" else [1, 4, 16]):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = _reference(kind, x, wts[0])
                for cfg in _configs(kind, i == 0):
                    cells.timed(kind, k, n, m, cfg, [lambda x, wt=wt, c=cfg, kd=kind: _call(kd, c, x, wt)
                                                     for wt in wts], x, ref)
        del wts
        torch.cuda.empty_cache()
        cells.save(out)


def cube(n: int = 8192) -> list[dict]:
    """n³ eager: bf16, `_scaled_mm` on pre-quantized x (kernel only), one-launch quantize + `_scaled_mm`,
    and the chunked side-stream overlap (2/4/8 chunks) and the same chunks on one stream."""
    import triton.testing

    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows
    from quantrt.platforms.cuda.kernels.scaled_mm_overlap import chunk_rows, scaled_mm_overlapped

    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    data, sc = _weights("", n, n)
    sb = sc.reshape(1, -1).contiguous()
    xq, sa = quant_rows(x, FP8, 448.0)

    def plain() -> torch.Tensor:
        q, s = quant_rows(x, FP8, 448.0)
        return torch._scaled_mm(q, data.t(), scale_a=s, scale_b=sb, out_dtype=torch.bfloat16)

    def serial(chunks: int) -> torch.Tensor:
        q = torch.empty_like(xq)
        s = torch.empty_like(sa)
        y = torch.empty((n, n), device="cuda", dtype=torch.bfloat16)
        for r0, r1 in chunk_rows(n, chunks):
            quant_rows(x[r0:r1], FP8, 448.0, out=(q[r0:r1], s[r0:r1]))
            torch._scaled_mm(q[r0:r1], data.t(), scale_a=s[r0:r1], scale_b=sb, out_dtype=torch.bfloat16, out=y[r0:r1])
        return y

    ref = plain()
    runs = {"bf16": lambda: F.linear(x, wb),
            "scaled_mm_only": lambda: torch._scaled_mm(xq, data.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
            "quant_only": lambda: quant_rows(x, FP8, 448.0),
            "quant+scaled_mm": plain}
    for c in (2, 4, 8):
        runs[f"overlap{c}"] = lambda c=c: scaled_mm_overlapped(x, data, sb, 448.0, torch.bfloat16, c)
        runs[f"serial{c}"] = lambda c=c: serial(c)
    rows = []
    for name, fn in runs.items():
        try:
            y = fn()
            same = bool(torch.equal(y, ref)) if name.startswith(("overlap", "serial")) else None
            us = triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median") * 1e3
        except Exception as e:  # noqa: BLE001
            print(f"# cube {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        rows.append(dict(kind=name, us=us, tflops=2 * n**3 / us / 1e6, equal=same))
        print(f"cube {name:16s} {us:8.1f} us {2 * n**3 / us / 1e6:6.0f} TFLOP/s equal={same}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="fp8_sweep.json")
    ap.add_argument("--quick", action="store_true", help="8192² only")
    ap.add_argument("--no-cube", action="store_true")
    ap.add_argument("--no-precompile", action="store_true")
    a = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    t = time.time()
    shapes = SHAPES[:1] if a.quick else SHAPES
    # a hang in the in-launch scale protocol would show here first
    x = torch.randn(16, 8192, device="cuda", dtype=torch.bfloat16)
    wt = _weights("", 8192, 8192)
    y = _call("swap_tok", SWAP[0], x, wt)
    torch.cuda.synchronize()
    err = float((y.float() - _reference("swap_tok", x, wt)).norm() / _reference("swap_tok", x, wt).norm())
    print(f"# smoke swap fused M=16: rel err {err:.2e} ({time.time() - t:.1f}s)", flush=True)
    if not a.no_precompile:
        precompile("_fp8_sweep", _variants(shapes), workers=14)
    cells = Cells(time_us)
    out = {}
    try:
        sweep(cells, shapes, [1, 2, 4, 8, 16, 32], a.json)
    finally:
        cells.save(a.json)
    cells.report()
    if not a.no_cube:
        out["cube"] = cube()
    out["cells"] = cells.res
    with open(a.json, "w") as f:
        json.dump(out, f, indent=0)
    print(f"# done in {time.time() - t:.0f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
