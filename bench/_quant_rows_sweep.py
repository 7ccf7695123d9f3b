"""Per-token activation quantization (`act_quant_triton.quant_rows`, issue 6) on the H100: the two-pass launch
it replaced (`old`: the two-pass kernel it keeps for K > 16384, at the old launch config), the first one-pass launch of this pass (`r1`: fp32 `div_rn` per element,
copied below) and the committed one-pass launch (fp64 reciprocal product) at its default and at every
(rows per program, warps) config, at M = 16..512 and K = 4096 / 14336 bf16 (plus the 8192² prefill shape).

    python bench/_quant_rows_sweep.py [--json out.json] [--rep-ms 5]
    python bench/_quant_rows_sweep.py --prove     # CPU: the fp64 quotient vs IEEE fp32 x / s, every bf16 x

Each cell is first checked bit-exact (codes and scales, fp8 e4m3 and int8) against
`quantize_act_per_token`, then timed as the median CUDA-graph replay (`kernels.time_us`); x stays in the L2
as it does after the RMSNorm that writes it. `copy` is a bf16 device copy of x (read 2 + write 2 bytes per
element against the quantizer's 2 + 1) for scale. Every variant is compiled first in worker processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, "bench")
from kernels import time_us  # noqa: E402

# the two-pass kernel that `quant_rows` keeps for K > 16384 is the launch before this pass (commit 963ff8c)
from quantrt.platforms.cuda.kernels.act_quant_triton import (  # noqa: E402
    _quant_rows_kernel,
    one_pass_config,
    quant_rows,
)
from quantrt.quant.quantize import quantize_act_per_token  # noqa: E402

FP8 = torch.float8_e4m3fn
MS = [16, 32, 64, 128, 256, 512]
KS = [4096, 14336]
CONFIGS = {4096: [(1, 4), (1, 8), (1, 16), (2, 8), (2, 16), (4, 16)],
           14336: [(1, 4), (1, 8), (1, 16), (1, 32), (2, 16)],
           8192: [(1, 8), (1, 16), (2, 16)]}
R1_WARPS = {4096: 16, 14336: 32, 8192: 16}  # the fastest r1 config of its own sweep (1 row per program)
PREFILL = (8192, 8192)  # (M, K)


def old_quant_rows(x: torch.Tensor, dtype: torch.dtype, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=dtype)
    s = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    block = min(4096, max(256, triton.next_power_of_2(triton.cdiv(k, 4))))
    _quant_rows_kernel[(m,)](x, q, s, x.stride(0), K=k, QMAX=qmax, IS_INT=dtype == torch.int8, BLOCK=block,
                             num_warps=4)
    return q, s


@triton.jit
def _r1_quant_rows_kernel(x_ptr, q_ptr, s_ptr, M, stride_xm, K: tl.constexpr, QMAX: tl.constexpr,
                          IS_INT: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr):
    """Round 1 of this pass (commit 79e8562): whole rows in registers, IEEE fp32 division per element."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK_K)
    rmask = rows < M
    mask = rmask[:, None] & (offs[None, :] < K)
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_xm + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / QMAX
    tl.store(s_ptr + rows, s, mask=rmask)
    y = tl.math.div_rn(x, s[:, None])
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_INT:
        y = (y + 12582912.0) - 12582912.0
    tl.store(q_ptr + r64[:, None] * K + offs[None, :], y.to(q_ptr.dtype.element_ty), mask=mask)


def r1_quant_rows(x: torch.Tensor, dtype: torch.dtype, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=dtype)
    s = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    _r1_quant_rows_kernel[(m,)](x, q, s, m, x.stride(0), K=k, QMAX=qmax, IS_INT=dtype == torch.int8,
                                BLOCK_K=triton.next_power_of_2(k), ROWS=1, num_warps=R1_WARPS[k])
    return q, s


def _fns(k: int) -> dict:
    """name -> quant_rows-like callable (x, dtype, qmax) for rows of width k."""
    fns = {"old": old_quant_rows, "r1": r1_quant_rows, "new": quant_rows}
    for cfg in CONFIGS[k]:
        fns[f"{cfg[0]}x{cfg[1]}"] = lambda x, d, q, cfg=cfg: quant_rows(x, d, q, cfg)
    return fns


def _compile(jobs: list[tuple[int, str]]) -> None:
    """A worker process: run every (k, name) once for fp8 and int8 (fills Triton's on-disk cache)."""
    for k, name in jobs:
        x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
        for dtype, qmax in ((FP8, 448.0), (torch.int8, 127.0)):
            try:
                _fns(k)[name](x, dtype, qmax)
            except Exception as e:  # noqa: BLE001  (reported again, in full, by the timed pass)
                print(f"# compile {k} {name}: {type(e).__name__}", file=sys.stderr, flush=True)
    torch.cuda.synchronize()


def precompile(workers: int = 8) -> None:
    t = time.time()
    jobs = [(k, name) for k in (*KS, PREFILL[1]) for name in _fns(k)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_compile, [jobs[i::workers] for i in range(workers)])
    print(f"# precompiled {len(jobs)} variants in {time.time() - t:.1f} s", flush=True)


def prove() -> None:
    """Every finite bf16 x with |x| <= amax, every positive bf16 amax, QMAX 448 and 127: RN32(x * RN64(1/s))
    (the kernel's quotient) == the IEEE fp32 x / s that torch computes. numpy, CPU, ~1 minute."""
    import numpy as np

    bits = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    allx = bits.float().numpy()
    allx = allx[np.isfinite(allx)]
    bad = n = 0
    for qmax in (np.float32(448.0), np.float32(127.0)):
        for amax in np.unique(allx[allx > 0]):
            s = np.float32(max(amax, np.float32(1e-12)) / qmax)
            x = allx[np.abs(allx) <= amax]
            ref = (x / s).view(np.int32)
            got = (x.astype(np.float64) * (np.float64(1.0) / np.float64(s))).astype(np.float32).view(np.int32)
            bad += int((got != ref).sum())
            n += x.size
    print(f"fp64 quotient vs IEEE fp32 division: {n} (x, amax, QMAX) cases, {bad} differ")
    if bad:
        raise SystemExit(1)


def _exact(fn, x: torch.Tensor) -> bool:
    """fp8 and int8 codes + scales of fn(x, dtype, qmax) bit-equal to quantize_act_per_token."""
    for dtype, qmax in ((FP8, 448.0), (torch.int8, 127.0)):
        q, s = fn(x, dtype, qmax)
        q_ref, s_ref = quantize_act_per_token(x, dtype)
        if not (torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))):
            return False
    return True


def cell(m: int, k: int, rep_ms: float) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
    x[:, ::977] *= 40                                  # outliers, as real activations have
    x[m // 2] = 0                                      # the 1e-12 floor
    dst = torch.empty_like(x)
    row = dict(m=m, k=k, default=list(one_pass_config(m, k)), exact={}, us={})
    fns = _fns(k)
    for name, fn in fns.items():
        try:
            row["exact"][name] = _exact(fn, x)
            row["us"][name] = time_us([lambda fn=fn: fn(x, FP8, 448.0)], rep_ms)
        except Exception as e:  # noqa: BLE001  (a config that does not compile is reported, not fatal)
            row["exact"][name] = f"{type(e).__name__}: {str(e)[:120]}"
    row["us"]["copy"] = time_us([lambda: dst.copy_(x)], rep_ms)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--rep-ms", type=float, default=5.0)
    ap.add_argument("--prove", action="store_true")
    args = ap.parse_args()
    if args.prove:
        return prove()
    precompile()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    rows = [cell(m, k, args.rep_ms) for k in KS for m in MS] + [cell(*PREFILL, args.rep_ms)]
    print("\n|   M |     K | old µs | r1 µs | new µs | old/new | copy µs | new config (rows, warps) | best config µs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        us = r["us"]
        cfgs = {n: t for n, t in us.items() if "x" in n}
        best = min(cfgs, key=cfgs.get)
        print(f"| {r['m']:4d} | {r['k']:5d} | {us['old']:6.2f} | {us['r1']:5.2f} | {us['new']:6.2f} | {us['old'] / us['new']:5.2f}x | "
              f"{us['copy']:6.2f} | {tuple(r['default'])} | {best} {cfgs[best]:.2f} |")
    print("\nall configs (µs):")
    for r in rows:
        print(r["m"], r["k"], " ".join(f"{n}={t:.2f}" for n, t in r["us"].items()))
    bad = {(r["m"], r["k"], n): v for r in rows for n, v in r["exact"].items() if v is not True}
    print("bit-exact vs quantize_act_per_token (fp8 + int8):", "all" if not bad else f"FAILED {bad}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
