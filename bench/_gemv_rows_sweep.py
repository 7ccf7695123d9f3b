"""W8A8 at 2-16 rows on the H100 (issue 6 items 1/4, thirteenth session in docs/PERFORMANCE.md): the row GEMV
`gemv_w8_rows` (`gemv_w8`'s structure, one weight load for all rows) per tile, next to the dispatch before it
(`QUANTRT_CUDA_GEMV_ROWS=0`: `frag_w8` / `swap_fp8` / `codes_mm` with their activation-code launch) and bf16 cuBLAS:

    cd bench && python _gemv_rows_sweep.py --json rows.json [--shapes "[(8192, 8192)]"] [--ms "[2, 4, 8, 16]"] \
        [--cfgs "[(16, 512, 8)]"] [--kinds "['rows:tok', 'rows:i8']"]

Schemes as in `_fp8_gemv_sweep.py` (tok: fp8 per channel x per token; i8: int8 per channel x per token). Every
variant is checked against the float64 quantize-then-matmul first; timed as `bench/kernels.py` times (median
CUDA-graph replay over weight copies that overflow the L2). Prints the best tile per (kind, K, N, M) with its
ratio to bf16 cuBLAS, then `before` and the best tile side by side; then the linear as the model runs it behind
the op that makes its input (add + RMSNorm, or act * mul for K = 14336): (producer + linear) - producer, the path
before taking its codes from the producer where it can (`row_codes`), the row GEMV the producer's bf16 rows
(default tile). `--no-model` skips that part.
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
MODEL = True   # also the linear behind its producer (`model_cells`); --no-model: kernels only


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
                if MODEL:
                    os.environ["QUANTRT_CUDA_GEMV_ROWS"] = f"{scheme.replace('tok', 'fp8')}:16"
                    rk = [_kernel(scheme, wt) for wt in wts] if _fits(kind, m) else []
                    model_cells(cells, scheme, k, n, m, kerns, rk)
                    os.environ["QUANTRT_CUDA_GEMV_ROWS"] = "0"
                if _fits(kind, m):
                    for cfg in CFGS:
                        fns = [lambda x, wt=wt, c=cfg, kd=kind: _call(kd, c, x, wt) for wt in wts]
                        cells.timed(kind, k, n, m, cfg, fns, x, ref)
            os.environ.pop("QUANTRT_CUDA_GEMV_ROWS")
            del wts, kerns
            torch.cuda.empty_cache()
        cells.save(out)


def _producer(k: int, m: int):
    """The op that makes a linear's input in the model, and its codes variant: add + RMSNorm (qkv, o's K = 4096
    rows, gate_up) or act * mul (down, K = 14336)."""
    from quantrt.platforms.cuda.layer_ops import ONE_PASS_MAX_K, triton_act_mul, triton_add_rms_norm

    if k <= ONE_PASS_MAX_K:
        x, delta = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(m, k, device="cuda",
                                                                                       dtype=torch.bfloat16)
        wn = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
        return lambda codes=None: triton_add_rms_norm(x, delta, wn, 1e-5, codes)[0]
    gu = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)
    return lambda codes=None: triton_act_mul(gu, False, codes)


def model_cells(cells: Cells, kind: str, k: int, n: int, m: int, kerns: list, rows_kerns: list) -> None:
    """The linear as the model runs it behind the op that makes its input: (producer + linear) - producer, with
    the dispatch before (codes from the producer where the path takes them, `row_codes`) and the row GEMV (the
    producer's bf16 output; the kernel quantizes its rows)."""
    make = _producer(k, m)
    x = torch.zeros(1)
    cells.timed(f"model_prod:{kind}", k, n, m, None, [lambda x, f=make: f() for _ in kerns], x)
    codes = kerns[0].row_codes(m)
    cells.timed(f"model_before:{kind}", k, n, m, (kerns[0]._plan(m)[0], codes is not None),
                [lambda x, kk=kk, f=make, c=codes: kk.apply(f(c), None) for kk in kerns], x)
    if rows_kerns:
        cells.timed(f"model_rows:{kind}", k, n, m, (rows_kerns[0]._plan(m)[0],),
                    [lambda x, kk=kk, f=make: kk.apply(f(), None) for kk in rows_kerns], x)


def _share(t: float | None, prod: float, bf: float) -> str:
    return "-" if t is None else f"{t - prod:.2f} {bf / (t - prod):.2f}x"


def compare_model(res: list[dict]) -> None:
    """Per (scheme, K, N, M): the linear's share behind its producer, before vs the row GEMV (µs, x bf16)."""
    at = {(r["kind"], r["k"], r["n"], r["m"]): r["us"] for r in res}
    print("| scheme | (K, N) | M | bf16 | producer | before's share | rows' share |")
    for kind, k, n, m in sorted(at):
        if not kind.startswith("model_prod:"):
            continue
        scheme = kind.split(":")[1]
        prod, bf = at[kind, k, n, m], at.get(("bf16", k, n, m), float("nan"))
        before, rows = at.get((f"model_before:{scheme}", k, n, m)), at.get((f"model_rows:{scheme}", k, n, m))
        print(f"| {scheme} | {k}x{n} | {m} | {bf:.2f} | {prod:.2f} | {_share(before, prod, bf)} | "
              f"{_share(rows, prod, bf)} |")


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
    global MODEL
    a = sweep_args(__doc__, "rows.json", {"shapes": SHAPES, "ms": MS, "cfgs": CFGS, "kinds": KINDS}, ("no_model",))
    MODEL = not a.no_model
    variants = [(kind, k, n, m, c) for k, n in SHAPES for kind in KINDS for m in MS if _fits(kind, m) for c in CFGS]
    precompile("_gemv_rows_sweep", variants, 12)
    cells = Cells(functools.partial(time_us, rep_ms=a.rep_ms))
    sweep(cells, a.json)
    cells.report()
    compare(cells.res)
    compare_model(cells.res)
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
