"""Tile sweep of the 8-bit W8A8 kernels on codes at 2..32 rows, `frag_w8` (mma.sync on fragments loaded straight
from memory) or with `--kernel ring` `ring_w8` (TMA ring, wgmma from shared memory), against the W8A8 dispatch
it would replace and bf16 cuBLAS, at the Llama-3.1-8B shapes (H100; run from bench/).

    python _frag_sweep.py --json out.json [--kernel frag|ring] [--ms 2,8,16,32] [--kinds fp8,int8] \
        [--shapes 8192x8192,...] [--cfgs "[...]"]

Both sides include their per-token activation launch (`quant_rows` here); with `--given` the codes are made before
the timed calls, as the norm makes them in the model (the dispatch then takes them where its path runs on codes).
Every cell is a CUDA-graph replay over weight copies that overflow the L2 (`kernels.time_us`); every variant's
output is checked against the float64 product of the same codes first. Prints the best tile per (kind, M, K, N)
as the kernel's `_TILES` stores it: frag (reps, warps, waves, prefetch, unroll, hint, pdl); ring `RingW8Config`
(block_n, block_k, stages, waves, split_k, block_m, pdl, boxes). The dispatch column runs with
QUANTRT_CUDA_RING_W8=0 (the path before the ring).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

SHAPES = [(8192, 8192), (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
# (reps, warps, waves, prefetch, unroll, hint, pdl)
CFGS = {"frag": [(2, 4, 4, 1, 4, 1, 1), (2, 4, 4, 1, 4, 1, 0), (2, 4, 2, 1, 8, 1, 1), (2, 2, 8, 1, 4, 1, 1),
                 (2, 4, 4, 0, 16, 1, 1), (2, 4, 4, 0, 4, 1, 1), (2, 4, 2, 0, 8, 1, 1), (2, 8, 2, 1, 4, 1, 1)],
        # (block_n, block_k, stages, waves, split_k, block_m, pdl); block_m is raised to the row bucket
        "ring": [(128, 128, 4, 2, 0, 8, 1), (128, 128, 6, 2, 0, 8, 1), (128, 128, 8, 1, 0, 8, 1),
                 (128, 128, 4, 3, 0, 8, 1), (64, 128, 6, 3, 0, 8, 1), (64, 128, 8, 2, 0, 8, 1),
                 (128, 128, 10, 1, 0, 8, 1), (128, 128, 6, 2, 0, 8, 0)]}
DT = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def _weight(kind: str, n: int, k: int) -> torch.Tensor:
    if kind == "int8":
        return torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    return (torch.randn(n, k, device="cuda") * 100).clamp(-448, 448).to(DT[kind])


def _dispatch(kind: str, w: torch.Tensor, sw: torch.Tensor):
    from kernels import PLATFORM

    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, IntWeight, ScaleGranularity

    if kind == "int8":
        wt = IntWeight(w, sw.reshape(-1, 1), 8, w.shape[1])
    else:
        wt = FloatWeight(w, sw, ScaleGranularity.CHANNEL)
    return TritonW8A8Kernel.prepare(LinearSpec(wt, ActScheme(ActKind.DYNAMIC_TOKEN, DT[kind]), torch.bfloat16),
                                    PLATFORM)


def _ours(kernel: str, kind: str, cfg: tuple, x, w: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 (quantized here, the launch timed too) or its (codes, scales) made beforehand (`--given`)."""
    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows

    q, s = x if isinstance(x, tuple) else quant_rows(x, DT[kind], 127.0 if kind == "int8" else 448.0)
    if kernel == "ring":
        from quantrt.platforms.cuda.kernels.ring_w8 import RingW8Config, ring_w8

        m = q.shape[0]
        bm = max(cfg[5], 8 if m <= 8 else 16 if m <= 16 else 32)
        return ring_w8(q, s, w, sw, torch.bfloat16, RingW8Config(*cfg[:5], bm, *cfg[6:]))
    from quantrt.platforms.cuda.kernels.frag_w8 import FragConfig, frag_w8

    return frag_w8(q, s, w, sw, torch.bfloat16, FragConfig(*cfg))


def _compile(chunk: list) -> int:
    done = 0
    for kernel, kind, k, n, m, cfg in chunk:
        try:
            _ours(kernel, kind, cfg, torch.randn(m, k, device="cuda", dtype=torch.bfloat16), _weight(kind, n, k),
                  torch.rand(n, device="cuda"))
            done += 1
        except Exception as e:  # noqa: BLE001
            print(f"# compile {kernel} {kind} {m} {k}x{n} {cfg}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
    torch.cuda.synchronize()
    return done


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    p.add_argument("--kernel", default="frag", choices=["frag", "ring"])
    p.add_argument("--given", action="store_true", help="codes made before the timed calls (as in the model): "
                   "ours, and the dispatch where its path takes codes")
    p.add_argument("--ms", default="2,8,16,32")
    p.add_argument("--kinds", default="fp8,int8")
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    p.add_argument("--cfgs", default=None, help="python list of the kernel's config tuples (module docstring)")
    p.add_argument("--rep-ms", type=float, default=30.0)
    p.add_argument("--workers", type=int, default=14)
    args = p.parse_args()
    os.environ["QUANTRT_CUDA_RING_W8"] = "0"    # the dispatch column: the path before the ring
    from kernels import time_us  # bench/ is sys.path[0]

    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows
    from quantrt.platforms.cuda.kernels.frag_w8 import frag_reference
    from quantrt.quant.kernel import QuantizedRows

    cfgs = eval(args.cfgs) if args.cfgs else CFGS[args.kernel]  # noqa: S307 - a sweep's own command line
    ms = [int(v) for v in args.ms.split(",")]
    kinds = args.kinds.split(",")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    t0 = time.perf_counter()
    variants = [(args.kernel, kd, k, n, m, c) for k, n in shapes for kd in kinds for m in ms for c in cfgs]
    chunks = [variants[i::args.workers] for i in range(args.workers)]
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx) as ex:
        done = sum(ex.map(_compile, chunks))
    print(f"# compiled {done}/{len(variants)} variants in {time.perf_counter() - t0:.0f} s", flush=True)
    out: list[dict] = []
    print(f"| kind | M | K x N | bf16 us | dispatch us | best {args.kernel} us (tile) | vs dispatch | x bf16 | "
          "% of copy |", flush=True)
    for k, n in shapes:
        copies = max(2, math.ceil(4 * 50e6 / (n * k)))
        wbf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, copies // 2))]
        sw = torch.rand(n, device="cuda") * 0.01 + 1e-3
        for kind in kinds:
            ws = [_weight(kind, n, k) for _ in range(copies)]
            kerns = [_dispatch(kind, w, sw) for w in ws]
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                q, s = quant_rows(x, DT[kind], 127.0 if kind == "int8" else 448.0)
                ref = frag_reference(q, s, ws[0], sw)
                bf16 = time_us([lambda w=w, x=x: F.linear(x, w) for w in wbf], args.rep_ms)
                xin = x
                if args.given:   # codes made beforehand, as the norm makes them (where the path takes them)
                    xin = (q, s)
                    pre = QuantizedRows(q, s) if kerns[0].row_codes(m) is not None else x
                    base = time_us([lambda kr=kr, p=pre: kr.apply(p, None) for kr in kerns], args.rep_ms)
                else:
                    base = time_us([lambda kr=kr, x=x: kr.apply(x, None) for kr in kerns], args.rep_ms)
                cells = []
                for c in cfgs:
                    try:
                        y = _ours(args.kernel, kind, c, xin, ws[0], sw).double()
                        err = ((y - ref).abs().max() / ref.abs().max()).item()
                        if not err < 8e-3:
                            raise AssertionError(f"rel err {err:.3g}")
                        us = time_us([lambda w=w, c=c, x=xin, kd=kind, s=sw: _ours(args.kernel, kd, c, x, w, s)
                                      for w in ws], args.rep_ms)
                    except Exception as e:  # noqa: BLE001 - report the variant and go on
                        print(f"# {kind} {m} {k}x{n} {c}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr,
                              flush=True)
                        continue
                    cells.append((us, c))
                    out.append({"kernel": args.kernel, "kind": kind, "m": m, "k": k, "n": n, "cfg": c, "us": us,
                                "base_us": base, "bf16_us": bf16, "err": err})
                best = min(cells) if cells else (float("nan"), None)
                pct = (n * k + m * k + 2 * m * n) / (best[0] * 1e-6) / 3.0e12 * 100
                print(f"| {kind} | {m} | {k}x{n} | {bf16:.1f} | {base:.1f} | {best[0]:.1f} {best[1]} | "
                      f"{base / best[0]:.2f}x | {bf16 / best[0]:.2f}x | {pct:.0f}% |", flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(out, f)
            del ws, kerns
        del wbf
        torch.cuda.empty_cache()
    print(f"# {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
