"""Tile sweep of `codes_mm` (8-bit W8A8 on per-token codes, split-K) against cuBLASLt `_scaled_mm` (fp8) or the
W8A8 dispatch at the Llama-3.1-8B shapes, M = 16..256 (H100; run from bench/).

    python _codes_mm_sweep.py --json out.json [--ms 64,128] [--shapes 14336x4096,...]
    python _codes_mm_sweep.py --int8 --ms 32,64,128,256 --json out.json   # int8 vs the dispatch (_int_mm, swap)

Both sides include the per-token quantization launch (`quant_rows`), as the W8A8 dispatch runs them; every
cell is timed as a CUDA-graph replay over weight copies that overflow the L2 (`kernels.time_us`), next to
bf16 cuBLAS, and every variant's output is checked against `_scaled_mm`'s before it is timed. Prints the best
tile per (M, K, N) as the tuple `codes_mm._TILES` stores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from kernels import time_us  # bench/ is sys.path[0]

from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows
from quantrt.platforms.cuda.kernels.codes_mm import CodesConfig, codes_mm

FP8 = torch.float8_e4m3fn
SHAPES = [(8192, 8192), (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
# (block_m, block_n, block_k, waves, num_warps, num_stages)
CFGS = {
    64: [(64, 64, 128, 2, 4, 4), (64, 64, 256, 2, 4, 3), (64, 128, 128, 2, 4, 4), (64, 128, 256, 2, 4, 3),
         (64, 128, 128, 1, 4, 4), (64, 128, 128, 4, 4, 4), (64, 256, 128, 2, 8, 3), (64, 64, 128, 4, 4, 5)],
    128: [(64, 128, 128, 2, 4, 4), (128, 128, 128, 2, 8, 4), (128, 64, 128, 2, 4, 4), (64, 64, 128, 4, 4, 4),
          (128, 128, 256, 1, 8, 3), (128, 256, 128, 1, 8, 3)],
    256: [(128, 128, 128, 2, 8, 4), (128, 256, 128, 1, 8, 3), (64, 128, 128, 2, 4, 4), (128, 128, 128, 1, 8, 4)],
}
# second round (`--round2`): narrower and deeper tiles around round one's M = 64 winners (64 x 64, waves 2)
CFGS2 = {64: [(64, 32, 128, 2, 4, 4), (64, 32, 256, 2, 4, 3), (64, 64, 256, 4, 4, 3), (64, 64, 128, 3, 4, 5),
              (64, 64, 512, 2, 4, 2), (64, 32, 256, 4, 4, 4), (64, 64, 128, 2, 4, 4), (64, 64, 256, 2, 4, 3),
              (64, 64, 256, 2, 4, 4), (64, 64, 128, 1, 4, 6)]}
# M = 32 (`--ms 32 --vs-dispatch`): against what the W8A8 dispatch ran there before (`swap_fp8` row tiles)
CFGS[32] = [(32, 32, 256, 1, 4, 4), (64, 32, 256, 1, 4, 4), (32, 64, 256, 1, 4, 4), (32, 32, 128, 2, 4, 4),
            (64, 64, 256, 2, 4, 3), (32, 32, 256, 2, 4, 3), (64, 32, 128, 1, 4, 4), (32, 16, 256, 1, 4, 4)]
CFGS[16] = [(16, 32, 256, 1, 4, 4), (64, 32, 256, 1, 4, 4), (16, 64, 256, 1, 4, 4), (16, 32, 256, 2, 4, 3),
            (16, 16, 256, 1, 4, 4), (16, 32, 512, 1, 4, 3)]
# third round (`--round3`): around round two's winners (64 x 32 / 64 x 64, BK 128-256, waves 2)
CFGS3 = {64: [(64, 16, 256, 2, 4, 3), (64, 32, 256, 3, 4, 3), (64, 32, 512, 2, 4, 2), (64, 32, 128, 2, 4, 5),
              (64, 16, 128, 4, 4, 4), (64, 32, 256, 1, 4, 4), (64, 32, 128, 2, 4, 4), (64, 32, 256, 2, 4, 3),
              (64, 64, 256, 2, 4, 3), (64, 64, 256, 3, 4, 3), (64, 32, 256, 2, 4, 4)]}


# int8 (`--int8`): the fp8 winners' neighbourhood at every bucket the dispatch may give codes_mm (17-256 rows)
CFGS_I8 = {
    32: CFGS[32][:6],
    64: [(64, 32, 256, 1, 4, 4), (64, 64, 256, 2, 4, 3), (64, 32, 256, 2, 4, 3), (64, 64, 128, 2, 4, 4),
         (64, 128, 128, 2, 4, 4), (64, 32, 128, 2, 4, 4)],
    128: [(128, 64, 256, 1, 4, 3), (64, 64, 256, 1, 4, 4), (128, 128, 128, 1, 8, 4)] + CFGS[128][:4],
    256: CFGS[256] + [(128, 64, 256, 1, 4, 3)],
}


def _dispatch(w: torch.Tensor, sw: torch.Tensor):
    from kernels import PLATFORM

    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, IntWeight, ScaleGranularity

    if w.dtype == torch.int8:
        spec = LinearSpec(IntWeight(w, sw.reshape(-1, 1), 8, w.shape[1]), ActScheme(ActKind.DYNAMIC_TOKEN, w.dtype),
                          torch.bfloat16)
    else:
        spec = LinearSpec(FloatWeight(w, sw, ScaleGranularity.CHANNEL), ActScheme(ActKind.DYNAMIC_TOKEN, FP8),
                          torch.bfloat16)
    return TritonW8A8Kernel.prepare(spec, PLATFORM)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    p.add_argument("--ms", default="64,128,256")
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    p.add_argument("--rep-ms", type=float, default=60.0)
    p.add_argument("--round2", action="store_true", help="the CFGS2 tiles (M = 64 only)")
    p.add_argument("--round3", action="store_true", help="the CFGS3 tiles (M = 64 only)")
    p.add_argument("--int8", action="store_true", help="int8 codes (CFGS_I8) against the W8A8 dispatch")
    p.add_argument("--vs-dispatch", action="store_true",
                   help="baseline: the product's W8A8 dispatch (per-channel x per-token) instead of cuBLASLt")
    args = p.parse_args()
    cfgs = CFGS_I8 if args.int8 else CFGS3 if args.round3 else CFGS2 if args.round2 else CFGS
    dt, qm = (torch.int8, 127.0) if args.int8 else (FP8, 448.0)
    ms = [int(v) for v in args.ms.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    out: list[dict] = []
    t0 = time.perf_counter()
    print("| M | K x N | bf16 us | baseline us | best codes_mm us (cfg) | vs baseline |", flush=True)
    for k, n in shapes:
        copies = max(2, math.ceil(4 * 50e6 / (n * k)))
        ws = [(torch.randn(n, k, device="cuda") * 40).clamp(-qm, qm).round().to(dt) for _ in range(copies)]
        wbf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, copies // 2))]
        sw = torch.rand(n, device="cuda") * 0.01 + 1e-3
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

            def cublas(w, x=x, sw=sw):
                q, s = quant_rows(x, dt, qm)
                if args.int8:  # exact int32 products, scaled in fp32
                    return (torch._int_mm(q, w.t()).float() * s * sw.view(1, -1)).to(torch.bfloat16)
                return torch._scaled_mm(q, w.t(), scale_a=s, scale_b=sw.view(1, -1), out_dtype=torch.bfloat16)

            ref = cublas(ws[0]).float()
            bf16 = time_us([lambda w=w, x=x: F.linear(x, w) for w in wbf], args.rep_ms)
            if args.vs_dispatch or args.int8:
                kerns = [_dispatch(w, sw) for w in ws]
                base = time_us([lambda kr=kr, x=x: kr.apply(x, None) for kr in kerns], args.rep_ms)
            else:
                base = time_us([lambda w=w: cublas(w) for w in ws], args.rep_ms)
            cells = []
            for c in cfgs[m]:
                cfg = CodesConfig(*c)

                def ours(w, cfg=cfg, x=x, sw=sw):
                    q, s = quant_rows(x, dt, qm)
                    return codes_mm(q, s, w, sw, torch.bfloat16, cfg)

                try:
                    err = ((ours(ws[0]).float() - ref).abs().max() / ref.abs().max()).item()
                    if not err < 1e-2:
                        raise AssertionError(f"rel err {err:.3g}")
                    us = time_us([lambda w=w, f=ours: f(w) for w in ws], args.rep_ms)
                except Exception as e:  # noqa: BLE001 - report the variant and go on
                    print(f"# {m} {k}x{n} {c}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
                    continue
                cells.append((us, c))
                out.append({"m": m, "k": k, "n": n, "cfg": c, "us": us, "cublas_us": base, "bf16_us": bf16,
                            "codes": "i8" if args.int8 else "f8"})
            best = min(cells) if cells else (float("nan"), None)
            print(f"| {m} | {k}x{n} | {bf16:.1f} | {base:.1f} | {best[0]:.1f} {best[1]} | {base / best[0]:.2f}x |",
                  flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f)
        del ws, wbf
        torch.cuda.empty_cache()
    print(f"# {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
