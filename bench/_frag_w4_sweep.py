"""Tile sweep of `frag_w4` (W4A16 at 1..16 rows through mma.sync on words loaded straight from memory) against
the W4A16 dispatch it would replace (`ring_wna16` there) and bf16 cuBLAS, at the Llama-3.1-8B shapes (H100; run
from bench/).

    python _frag_w4_sweep.py --json out.json [--ms 1,4,8,16] [--shapes 8192x8192,...] [--cfgs "[(4, 2, 4)]"]

GPTQ-style symmetric g128 weights (`kernels.int_weight`); every cell is a CUDA-graph replay over weight copies
that overflow the L2 (`kernels.time_us`); every variant is checked against `ring_reference` (float64) first.
Prints the best tile per (M, K, N) as `frag_w4._TILES` stores it: (warps, reps, waves, prefetch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

SHAPES = [(8192, 8192), (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
CFGS = [(4, 1, 8, 1), (4, 1, 4, 1), (4, 1, 8, 0), (2, 1, 8, 1), (8, 1, 4, 1), (4, 2, 4, 1), (4, 1, 2, 1), (2, 1, 16, 1)]


def _kernel(n: int, k: int):
    from kernels import PLATFORM, int_weight

    from quantrt.platforms.cuda.kernels import TritonWNA16Kernel
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import ActScheme

    return TritonWNA16Kernel.prepare(LinearSpec(int_weight(n, k, 4, 128), ActScheme(), torch.bfloat16), PLATFORM)


def _ours(kern, cfg: tuple, x: torch.Tensor) -> torch.Tensor:
    from quantrt.platforms.cuda.kernels.frag_w4 import FragW4Config, frag_w4

    return frag_w4(x, kern.packed, kern.scale, kern.skinny_zero, kern.group, kern.zero_const, FragW4Config(*cfg))


def _compile(chunk: list) -> int:
    done = 0
    for k, n, m, cfg in chunk:
        try:
            _ours(_kernel(n, k), cfg, torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            done += 1
        except Exception as e:  # noqa: BLE001
            print(f"# compile {m} {k}x{n} {cfg}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
    torch.cuda.synchronize()
    return done


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    p.add_argument("--ms", default="1,4,8,16")
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    p.add_argument("--cfgs", default=None, help="python list of (warps, reps, waves, prefetch)")
    p.add_argument("--rep-ms", type=float, default=30.0)
    p.add_argument("--workers", type=int, default=14)
    args = p.parse_args()
    from kernels import copies_for, time_us  # bench/ is sys.path[0]

    from quantrt.platforms.cuda.kernels.ring_wna16 import ring_reference

    cfgs = eval(args.cfgs) if args.cfgs else CFGS  # noqa: S307 - a sweep's own command line
    ms = [int(v) for v in args.ms.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    t0 = time.perf_counter()
    variants = [(k, n, m, c) for k, n in shapes for m in ms for c in cfgs]
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx) as ex:
        done = sum(ex.map(_compile, [variants[i::args.workers] for i in range(args.workers)]))
    print(f"# compiled {done}/{len(variants)} variants in {time.perf_counter() - t0:.0f} s", flush=True)
    out: list[dict] = []
    print("| M | K x N | bf16 us | dispatch us | best frag_w4 us (warps, reps, waves, prefetch) | vs dispatch | x bf16 "
          "| % of copy |", flush=True)
    for k, n in shapes:
        nbytes = n * k // 2 + n * (k // 128) * 4
        kerns = [_kernel(n, k) for _ in range(copies_for(nbytes))]
        wbf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            kr = kerns[0]
            ref = ring_reference(x, kr.packed, kr.scale, kr.skinny_zero, kr.group, kr.zero_const)
            bf16 = time_us([lambda w=w, x=x: F.linear(x, w) for w in wbf], args.rep_ms)
            base = time_us([lambda kk=kk, x=x: kk.apply(x, None) for kk in kerns], args.rep_ms)
            cells = []
            for c in cfgs:
                try:
                    err = ((_ours(kr, c, x).double() - ref).abs().max() / ref.abs().max()).item()
                    if not err < 8e-3:
                        raise AssertionError(f"rel err {err:.3g}")
                    us = time_us([lambda kk=kk, c=c, x=x: _ours(kk, c, x) for kk in kerns], args.rep_ms)
                except Exception as e:  # noqa: BLE001 - report the variant and go on
                    print(f"# {m} {k}x{n} {c}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
                    continue
                cells.append((us, c))
                out.append({"m": m, "k": k, "n": n, "cfg": c, "us": us, "base_us": base, "bf16_us": bf16,
                            "err": err})
            best = min(cells) if cells else (float("nan"), None)
            pct = (nbytes + 2 * m * (k + n)) / (best[0] * 1e-6) / 3.0e12 * 100
            print(f"| {m} | {k}x{n} | {bf16:.1f} | {base:.1f} | {best[0]:.1f} {best[1]} | {base / best[0]:.2f}x | "
                  f"{bf16 / best[0]:.2f}x | {pct:.0f}% |", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f)
        del kerns, wbf
        torch.cuda.empty_cache()
    print(f"# {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
