"""W8A8 at 2-16 rows on the H100 (issue 6 items 1/4, thirteenth session in docs/PERFORMANCE.md): the row GEMV
`gemv_w8_rows` (`gemv_w8`'s structure, one weight load for all rows) per tile, next to the dispatch before it
(`QUANTRT_CUDA_GEMV_ROWS=0`: `frag_w8` / `swap_fp8` / `codes_mm` with their activation-code launch) and bf16 cuBLAS:

    cd bench && python _gemv_rows_sweep.py --json rows.json [--shapes "[(8192, 8192)]"] [--ms "[2, 4, 8, 16]"] \
        [--cfgs "[(16, 512, 8)]"] [--kinds "['rows:tok', 'rows:i8']"]

Schemes as in `_fp8_gemv_sweep.py` (tok: fp8 per channel x per token; i8: int8 per channel x per token). Every
variant is checked against the float64 quantize-then-matmul first; timed as `bench/kernels.py` times (median
CUDA-graph replay over weight copies that overflow the L2). Prints the best tile per (kind, K, N, M) with its
ratio to bf16 cuBLAS, then `before` and the best tile side by side.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
from _fp8_gemv_sweep import SCHEMES, _kernel, _reference, _weights
from _sweep_common import Cells, precompile, sweep_args  # bench/ is sys.path[0]
from kernels import build, copies_for, time_us

SHAPES = [(8192, 8192), (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
MS = [2, 3, 4, 8, 16]
# (block_n, block_k, warps)
CFGS = [(16, 512, 8), (16, 1024, 8), (8, 1024, 4), (8, 512, 4), (32, 512, 8)]
KINDS = ["rows:tok", "rows:i8"]


def _call(kind: str, cfg: tuple, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.platforms.cuda.kernels.gemv_w8_rows import config, gemv_w8_rows

    act, wscale, qmax = SCHEMES[kind.split(":")[-1]]
    return gemv_w8_rows(x, wt[0], wt[1], act, wscale, qmax, None, config(cfg, x.shape[1]))


def _fits(kind: str, m: int) -> bool:
    from quantrt.platforms.cuda.kernels.gemv_w8_rows import FLOAT_ROWS_MAX, ROWS_MAX

    return m <= (ROWS_MAX if kind.endswith("i8") else FLOAT_ROWS_MAX)


def sweep(cells: Cells, out: str) -> None:
    for k, n in SHAPES:
        cells.baselines(build, ("bf16",), k, n, MS)
        for kind in KINDS:
            scheme = kind.split(":")[1]
            wts = [_weights(scheme, n, k, j) for j in range(copies_for(n * k))]
            os.environ["QUANTRT_CUDA_GEMV_ROWS"] = "0"
            kerns = [_kernel(scheme, wt) for wt in wts]
            for m in MS:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = _reference(scheme, x, wts[0])
                for kk in kerns:
                    kk._plans.pop(m, None)
                    kk._plan(m)                                                # the path before, cached
                cells.timed(f"before:{scheme}", k, n, m, (kerns[0]._plan(m)[0],),
                            [lambda x, kk=kk: kk.apply(x, None) for kk in kerns], x, ref)
                if _fits(kind, m):
                    for cfg in CFGS:
                        fns = [lambda x, wt=wt, c=cfg, kd=kind: _call(kd, c, x, wt) for wt in wts]
                        cells.timed(kind, k, n, m, cfg, fns, x, ref)
            os.environ.pop("QUANTRT_CUDA_GEMV_ROWS")
            del wts, kerns
            torch.cuda.empty_cache()
        cells.save(out)


def compare(res: list[dict]) -> None:
    """Per (scheme, K, N, M): before vs the best row tile (µs, x bf16)."""
    best: dict = {}
    for r in res:
        key = (r["kind"], r["k"], r["n"], r["m"])
        if r["err"] < 2e-2 and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    print("| scheme | (K, N) | M | bf16 | before (path) | best rows (tile) | rows / before |")
    for kind, k, n, m in sorted(best):
        if not kind.startswith("before:"):
            continue
        scheme = kind.split(":")[1]
        b, bf, rw = best[kind, k, n, m], best.get(("bf16", k, n, m)), best.get((f"rows:{scheme}", k, n, m))
        bfu = bf["us"] if bf else float("nan")
        row = f"{rw['us']:.2f} {bfu / rw['us']:.2f}x {tuple(rw['cfg'])}" if rw else "-"
        ratio = f"{rw['us'] / b['us']:.3f}" if rw else "-"
        print(f"| {scheme} | {k}x{n} | {m} | {bfu:.2f} | {b['us']:.2f} {bfu / b['us']:.2f}x {b['cfg'][0]} | {row} | "
              f"{ratio} |")


def main() -> None:
    a = sweep_args(__doc__, "rows.json", {"shapes": SHAPES, "ms": MS, "cfgs": CFGS, "kinds": KINDS})
    variants = [(kind, k, n, m, c) for k, n in SHAPES for kind in KINDS for m in MS if _fits(kind, m) for c in CFGS]
    precompile("_gemv_rows_sweep", variants, 12)
    cells = Cells(functools.partial(time_us, rep_ms=a.rep_ms))
    sweep(cells, a.json)
    cells.report()
    compare(cells.res)
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
