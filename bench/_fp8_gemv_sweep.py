"""W8A8 / fp8 weight-only M = 1 GEMV on the H100 (issue 6 items 1/4, "Sixth pass" in docs/PERFORMANCE.md): the
dense-GEMV-structured `gemv_w8.gemv_w8` tiles vs the dispatch before it (`TritonW8A8Kernel.apply` with
`w8a8.GEMV_W8` off: `skinny_fp8` / `swap_fp8`), bf16 cuBLAS and the bf16 dense GEMV, per scheme:

    tok  fp8 per-channel x per-token      blk  fp8 128x128 blocks x per-token-group 128
    wo   fp8 per-channel weight-only      i8   int8 per-channel x per-token

    python bench/_fp8_gemv_sweep.py --json out.json [--shapes "[(8192,8192)]"] [--cfgs "[(16,1024,2,8,1,4096)]"]

Timed as `bench/kernels.py` times (median CUDA-graph replay over weight copies that overflow the 50 MB L2) after
a relative-error check against float64 quantize-then-matmul. Bytes = codes + scales + x + y over the 3.0 TB/s
copy ceiling (`% copy`). Every config is compiled first in parallel worker processes.
"""

from __future__ import annotations

import argparse
import ast
import functools
import sys

import torch
import torch.nn.functional as F
from _sweep_common import Cells, precompile  # bench/ is sys.path[0]
from kernels import copies_for, time_us

FP8 = torch.float8_e4m3fn
REP_MS = 25  # CUDA-graph replay per cell (`kernels.time_us`)
COPY_TBS = 3.0
SHAPES = [(8192, 8192), (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
# GemvW8Config (block_n, block_k, waves, warps, widen, amax_block)
CFGS = [(16, 1024, 2, 8, 1, 4096), (16, 1024, 2, 8, 0, 4096), (8, 2048, 2, 8, 1, 4096), (32, 512, 2, 8, 1, 4096),
        (16, 1024, 2, 4, 1, 4096), (32, 1024, 2, 8, 1, 4096), (8, 1024, 2, 4, 1, 4096), (16, 2048, 2, 8, 1, 8192)]
SCHEMES = {"tok": (0, 1, 448.0), "blk": (1, 2, 448.0), "wo": (3, 1, 1.0), "i8": (0, 1, 127.0)}


def _weights(kind: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    scheme = kind.split(":")[-1]
    if scheme == "i8":
        data = torch.randint(-127, 128, (n, k), device="cuda", generator=g, dtype=torch.int8)
    else:
        data = (torch.randn(n, k, device="cuda", generator=g) * 100).clamp(-448, 448).to(FP8)
    if scheme == "blk":
        return data, torch.rand(n // 128, k // 128, device="cuda", generator=g) * 0.01
    return data, torch.rand(n, device="cuda", generator=g) * 0.01


def _call(kind: str, cfg: tuple, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.platforms.cuda.kernels.gemv_w8 import GemvW8Config, gemv_w8

    act, wscale, qmax = SCHEMES[kind.split(":")[-1]]
    return gemv_w8(x, wt[0], wt[1], act, wscale, qmax, None, GemvW8Config(*cfg))


def _kernel(scheme: str, wt: tuple):
    """TritonW8A8Kernel for the scheme over one weight (its dispatch as committed)."""
    from quantrt.platform.interface import DeviceCapability
    from quantrt.platforms.cuda.kernels.w8a8 import TritonW8A8Kernel
    from quantrt.platforms.cuda.platform import CudaPlatform
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, IntWeight, ScaleGranularity

    data, sc = wt
    if scheme == "i8":
        w, a = IntWeight(data, sc.reshape(-1, 1), 8, data.shape[1]), ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8)
    elif scheme == "blk":
        w = FloatWeight(data, sc, ScaleGranularity.BLOCK, (128, 128))
        a = ActScheme(ActKind.DYNAMIC_GROUP, FP8, 128)
    else:
        w = FloatWeight(data, sc, ScaleGranularity.CHANNEL)
        a = ActScheme(ActKind.DYNAMIC_TOKEN, FP8) if scheme == "tok" else ActScheme()
    return TritonW8A8Kernel.prepare(LinearSpec(w, a, torch.bfloat16), CudaPlatform(capability=DeviceCapability(9, 0)))


def _reference(scheme: str, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    """float64 quantize-then-matmul."""
    from quantrt.quant.quantize import quantize_act_per_token, quantize_act_per_token_group

    data, sc = wt
    if scheme == "blk":
        w = data.double() * sc.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
        q, sg = quantize_act_per_token_group(x, FP8, 128)
        return ((q.double() * sg.double().repeat_interleave(128, 1)) @ w.t()).float()
    w = data.double() * sc.double()[:, None]
    if scheme == "wo":
        return (x.double() @ w.t()).float()
    q, sx = quantize_act_per_token(x, torch.int8 if scheme == "i8" else FP8)
    return ((q.double() * sx.double()) @ w.t()).float()


def sweep(cells: Cells, shapes: list, cfgs: list, schemes: list, out: str, before: bool) -> None:
    from quantrt.platforms.cuda.kernels import w8a8
    from quantrt.platforms.cuda.kernels.dense_gemv_triton import dense_gemv

    for k, n in shapes:
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(2 * n * k))]
        cells.timed("bf16", k, n, 1, None, [lambda x, w=w: F.linear(x, w) for w in ws], x)
        cells.timed("bf16_gemv", k, n, 1, None, [lambda x, w=w: dense_gemv(x, w) for w in ws], x)
        del ws
        for scheme in schemes:
            wts = [_weights(scheme, n, k, j) for j in range(copies_for(n * k))]
            ref = _reference(scheme, x, wts[0])
            kerns = [_kernel(scheme, wt) for wt in wts]
            if before:
                w8a8.GEMV_W8 = False
                cells.timed(f"before:{scheme}", k, n, 1, None, [lambda x, kk=kk: kk.apply(x, None) for kk in kerns],
                            x, ref)
            w8a8.GEMV_W8 = True
            cells.timed(f"after:{scheme}", k, n, 1, None, [lambda x, kk=kk: kk.apply(x, None) for kk in kerns],
                        x, ref)
            for cfg in cfgs:
                cells.timed(f"gemv:{scheme}", k, n, 1, cfg, [lambda x, wt=wt, c=cfg, s=scheme: _call(f"gemv:{s}", c, x, wt)
                                                            for wt in wts], x, ref)
            del wts, kerns
            torch.cuda.empty_cache()
        cells.save(out)


def table(res: list[dict]) -> None:
    """Per shape and scheme: bf16, best gemv config, before, after; µs, x bf16 cuBLAS, % of copy."""
    by = {}
    for r in res:
        key = (r["kind"], r["k"], r["n"])
        if r["err"] < 2e-2 and (key not in by or r["us"] < by[key]["us"]):
            by[key] = r
    print("| (K, N) | scheme | bf16 | bf16 GEMV | before | best gemv_w8 (cfg) | after (dispatch) |")
    for kind, k, n in sorted(by):
        if not kind.startswith("after:"):
            continue
        scheme = kind.split(":")[1]
        bf = by[("bf16", k, n)]["us"]
        wbytes = n * k + (n * k // 16384 * 4 if scheme == "blk" else 4 * n) + 2 * k + 2 * n

        def cell(key: tuple, bf: float = bf, wbytes: int = wbytes) -> str:
            c = by.get(key)
            if c is None:
                return "-"
            return f"{c['us']:.2f} {bf / c['us']:.2f}x {wbytes / (c['us'] * 1e-6) / (COPY_TBS * 1e12) * 100:.0f}%"
        g = by.get((f"gemv:{scheme}", k, n))
        print(f"| {k}x{n} | {scheme} | {bf:.2f} | {by[('bf16_gemv', k, n)]['us']:.2f} | "
              f"{cell((f'before:{scheme}', k, n))} | {cell((f'gemv:{scheme}', k, n))} {tuple(g['cfg']) if g else ''} | "
              f"{cell((kind, k, n))} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--shapes", default=None, help="python list of (K, N)")
    ap.add_argument("--cfgs", default=None, help="python list of GemvW8Config tuples")
    ap.add_argument("--schemes", default="tok,blk,wo,i8")
    ap.add_argument("--no-before", action="store_true")
    ap.add_argument("--workers", type=int, default=12)
    a = ap.parse_args()
    shapes = ast.literal_eval(a.shapes) if a.shapes else SHAPES
    cfgs = [tuple(c) for c in ast.literal_eval(a.cfgs)] if a.cfgs else CFGS
    schemes = a.schemes.split(",")
    variants = [(f"gemv:{s}", k, n, 1, c) for k, n in shapes for s in schemes for c in cfgs]
    precompile("_fp8_gemv_sweep", variants, a.workers)
    cells = Cells(functools.partial(time_us, rep_ms=REP_MS))
    sweep(cells, shapes, cfgs, schemes, a.json, not a.no_before)
    table(cells.res)
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
