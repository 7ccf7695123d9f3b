"""Experiment: W4A16 at M = 64-128 with the weight tile as the wgmma B operand, unpacked without a permute.

The packed words are [K/8, N] (code i of word j is k = 8j + i). `tc_wna16` unpacks a word's 8 codes into 8
planes and interleaves them with join + permute; here every k row of the [BK, BN] tile loads its word
(k // 8: each word 8 times, from L1) and shifts by 4 * (k % 8), so the tile is in k order with no permute;
x [BM, BK] is the A operand, split-K as `fp8_codes_mm`. Timed like the other sweeps (CUDA-graph replay
over weight copies > L2) against the W4A16 dispatch (`TritonWNA16Kernel.apply`) and bf16 cuBLAS.

    python _w4_rows_sweep.py [--ms 64,128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from kernels import PLATFORM, int_weight, time_us  # bench/ is sys.path[0]

from quantrt.platforms.cuda.kernels import TritonWNA16Kernel
from quantrt.platforms.cuda.kernels._common import cdiv, num_sms, split_counters
from quantrt.platforms.cuda.kernels.split_k_triton import store_split_k
from quantrt.quant.kernel import LinearSpec
from quantrt.quant.weights import ActScheme

SHAPES = [(8192, 8192), (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
# (block_m, block_n, block_k, waves, num_warps, num_stages)
CFGS = {64: [(64, 32, 128, 1, 4, 4), (64, 64, 128, 1, 4, 4), (64, 64, 128, 2, 4, 3), (64, 128, 128, 1, 4, 3),
             (64, 32, 64, 2, 4, 4), (64, 64, 64, 2, 4, 4), (64, 128, 64, 1, 8, 4), (64, 64, 128, 1, 8, 4)],
        128: [(128, 64, 128, 1, 8, 3), (64, 64, 128, 1, 4, 4), (128, 128, 64, 1, 8, 3), (128, 32, 128, 1, 4, 4)]}


@triton.jit
def _w4_rows_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, GROUP,
                    K_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    shift = (offs_k % 8) * 4                                                  # [BK]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for kt in range(0, K_PER_SPLIT, BK):
        k0 = k_start + kt
        kk = k0 + offs_k
        ok = k0 < K                                                           # the last split may run past K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & ok, other=0.0)
        words = tl.load(p_ptr + (kk // 8)[:, None] * N + offs_n[None, :], mask=mask_n[None, :] & ok, other=0)
        g = k0 // GROUP
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n & ok, other=0.0)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n & ok, other=0.0)     # 2**23 + zero
        q = (((words >> shift[:, None]) & 15) | 0x4B000000).to(tl.float32, bitcast=True)  # 2**23 + code, exact
        w = ((q - z[None, :]) * s[None, :]).to(a.dtype)                       # [BK, BN]: (code - zero) * s
        acc = tl.dot(a, w, acc)
    ym = offs_m[:, None] * N + offs_n[None, :]
    store_split_k(acc, y_ptr, ws_ptr, cnt_ptr, ym, mask_m[:, None] & mask_n[None, :], pid_m, pid_n, pid_k, M, N,
                  SPLIT)


def w4_rows(x, packed, scale, zero, group, cfg):
    bm, bn, bk, waves, warps, stages = cfg
    m, k = x.shape
    n = packed.shape[1]
    n_tiles, m_tiles, k_steps = cdiv(n, bn), cdiv(m, bm), k // bk
    split = max(1, min(k_steps, cdiv(waves * num_sms(0), n_tiles * m_tiles)))
    kps = cdiv(k_steps, split) * bk
    split = cdiv(k, kps)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else y
    cnt = split_counters(x.device, n_tiles * m_tiles) if split > 1 else packed
    _w4_rows_kernel[(n_tiles, split, m_tiles)](x, packed, scale, zero, y, ws, cnt, m, n, k, x.stride(0), group, kps,
                                              SPLIT=split, BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return y


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="64,128")
    p.add_argument("--json", default=None)
    p.add_argument("--rep-ms", type=float, default=60.0)
    args = p.parse_args()
    out = []
    print("| M | K x N | bf16 us | dispatch us | best w4_rows us (cfg) | vs dispatch |", flush=True)
    for k, n in SHAPES:
        copies = max(2, math.ceil(4 * 50e6 / (n * k // 2)))
        kerns = [TritonWNA16Kernel.prepare(LinearSpec(int_weight(n, k, 4, 128), ActScheme(), torch.bfloat16),
                                           PLATFORM) for _ in range(copies)]
        wbf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, copies // 4))]
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = kerns[0].apply(x, None).float()
            bf16 = time_us([lambda w=w, x=x: F.linear(x, w) for w in wbf], args.rep_ms)
            base = time_us([lambda kr=kr, x=x: kr.apply(x, None) for kr in kerns], args.rep_ms)
            cells = []
            for cfg in CFGS[m]:
                try:
                    y = w4_rows(x, kerns[0].packed, kerns[0].scale, kerns[0].zero, 128, cfg).float()
                    err = ((y - ref).abs().max() / ref.abs().max()).item()
                    if not err < 1e-2:
                        raise AssertionError(f"rel err {err:.3g}")
                    us = time_us([lambda kr=kr, x=x, cfg=cfg: w4_rows(x, kr.packed, kr.scale, kr.zero, 128, cfg)
                                  for kr in kerns], args.rep_ms)
                except Exception as e:  # noqa: BLE001
                    print(f"# {m} {k}x{n} {cfg}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr, flush=True)
                    continue
                cells.append((us, cfg))
                out.append({"m": m, "k": k, "n": n, "cfg": cfg, "us": us, "dispatch_us": base, "bf16_us": bf16})
            best = min(cells) if cells else (float("nan"), None)
            print(f"| {m} | {k}x{n} | {bf16:.1f} | {base:.1f} | {best[0]:.1f} {best[1]} | {base / best[0]:.2f}x |",
                  flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f)
        del kerns, wbf
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
