"""Batch 2-16 sweep of the pipelined tensor-core variants (seventh pass): `tc_wna16` W4A16 g128 with the next
K step prefetched into registers or TMA word tiles, and `swap_fp8` per-token W8A8 with TMA weight tiles,
next to the current tiles and bf16 cuBLAS of the same run.

    cd bench && python _tc_small_sweep.py --json out.json [--shapes "[(8192, 8192)]"] [--ms "[2, 16]"]
        [--tc "[TcConfig tuples]"] [--fp8 "[SwapFp8Config tuples]"] [--ttgir]

Variants are compiled first in parallel worker processes, then each is checked against x @ the
float64-dequantized weight (fake-quantized activations for W8A8) and timed as a CUDA-graph replay over weight
copies that overflow the L2 (`kernels.time_us`). A variant that fails the check is reported, not timed.
`--ttgir` prints, per compiled variant, how many TMA copies, cp.async copies, layout conversions and
shared-memory allocations its TTGIR holds (is the weight stream pipelined, are there extra round trips?).
"""

from __future__ import annotations

import argparse
import ast
import re

import torch
from _sweep_common import Cells, precompile  # bench/ is sys.path[0]

SHAPES = [(8192, 8192)]
MS = [2, 16]
# TcConfig(block_n, block_k, split_k, num_warps, num_stages, waves, swap, block_m, prefetch, tma)
TC = [(64, 128, 0, 4, 3, 4, True, 16, False, False),      # the current M <= 16 tile
      (64, 128, 0, 4, 3, 4, True, 16, True, False), (64, 128, 0, 4, 3, 2, True, 16, True, False),
      (64, 128, 0, 8, 3, 4, True, 16, True, False), (128, 128, 0, 8, 3, 2, True, 16, True, False),
      (64, 256, 0, 4, 3, 4, True, 16, True, False), (64, 128, 0, 4, 3, 8, True, 16, True, False),
      (64, 128, 0, 4, 3, 4, True, 16, False, True), (64, 128, 0, 4, 4, 2, True, 16, False, True),
      (64, 128, 0, 4, 6, 2, True, 16, False, True), (64, 256, 0, 4, 4, 2, True, 16, False, True),
      (128, 128, 0, 8, 4, 2, True, 16, False, True), (64, 128, 0, 4, 8, 1, True, 16, False, True)]
# SwapFp8Config(block_n, block_k, waves, num_warps, num_stages, block_m, tma)
FP8 = [(64, 256, 1, 4, 3, 16, False),                      # the current 8192² tile
       (64, 256, 1, 4, 3, 16, True), (64, 256, 1, 4, 4, 16, True), (64, 256, 2, 4, 4, 16, True),
       (64, 128, 2, 4, 6, 16, True), (64, 128, 4, 4, 4, 16, True), (128, 128, 1, 4, 4, 16, True),
       (128, 256, 1, 8, 3, 16, True), (128, 128, 2, 8, 4, 16, True), (64, 256, 2, 4, 3, 16, False)]
# GluonTcConfig(block_n, block_k, waves, split_k): the fragment-order Gluon kernel (tc_wna16_gluon)
GL = [(64, 128, 4, 0), (64, 128, 2, 0), (64, 128, 3, 0), (64, 128, 6, 0), (64, 128, 8, 0), (128, 128, 2, 0),
      (128, 128, 4, 0), (64, 64, 4, 0)]
KINDS = {"tc_w4": TC, "gl_w4": GL, "swap_fp8_tok": FP8}


def _weights(kind: str, n: int, k: int, seed: int = 0) -> tuple:
    from _tc_sweep import _weights as weights

    return weights("tc_w4" if kind == "gl_w4" else kind, n, k, seed)


def _call(kind: str, cfg: tuple, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.platforms.cuda.kernels.swap_fp8 import SwapFp8Config, swap_fp8
    from quantrt.platforms.cuda.kernels.tc_wna16 import TcConfig, tc_wna16

    if kind == "tc_w4":
        packed, scale, zero, group, bits = wt
        return tc_wna16(x, packed, scale, zero, group, TcConfig(*cfg), bits=bits)
    if kind == "gl_w4":
        from quantrt.platforms.cuda.kernels.tc_wna16_gluon import GluonTcConfig, tc_wna16_gluon

        packed, scale, zero, group, _ = wt
        return tc_wna16_gluon(x, packed, scale, zero, group, GluonTcConfig(*cfg))
    data, sc = wt
    return swap_fp8(x, data, sc, 0, 1, 448.0, None, SwapFp8Config(*cfg))


def _reference64(kind: str, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    """x @ W in float64 (per-token fake-quantized x for W8A8)."""
    from quantrt.quant.quantize import quantize_act_per_token

    if kind in ("tc_w4", "gl_w4"):
        packed, scale, zero, group, bits = wt
        shifts = torch.arange(8, device="cuda", dtype=torch.int32) * 4
        u = ((packed[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, packed.shape[1]).double()
        w = (u - (zero.double() - 2.0**23).repeat_interleave(group, 0)) * scale.double().repeat_interleave(group, 0)
        return x.double() @ w
    data, sc = wt
    q, sx = quantize_act_per_token(x, torch.float8_e4m3fn)
    return (q.double() * sx.double()) @ (data.double() * sc.double()[:, None]).t()


def _variants() -> list[tuple]:
    return [(kind, k, n, m, cfg) for k, n in SHAPES for kind, cfgs in KINDS.items() for m in MS for cfg in cfgs]


def _ttgir_summary() -> None:
    from quantrt.platforms.cuda.kernels.swap_fp8 import _swap_fp8_kernel
    from quantrt.platforms.cuda.kernels.tc_wna16 import _tc_wna16_kernel
    from quantrt.platforms.cuda.kernels.tc_wna16_gluon import _gluon_w4_kernel

    for fn in (_tc_wna16_kernel, _gluon_w4_kernel, _swap_fp8_kernel):
        for cache in fn.device_caches.values():
            for key, ck in cache[0].items():
                src = ck.asm.get("ttgir", "")
                counts = {op: len(re.findall(op, src)) for op in (
                    "async_tma_copy_global_to_local", "async_copy_global_to_local", "convert_layout",
                    "local_alloc", "warp_group_dot ", "ttng.wait_barrier")}
                try:
                    names = ck.src.fn.arg_names
                    tag = {names[i[0]]: v for i, v in ck.src.constants.items()
                           if names[i[0]] in ("BN", "BK", "PREFETCH", "TMA", "FRAG", "SPLIT", "BM")}
                except Exception:  # noqa: BLE001
                    tag = str(key)[-120:]
                print(f"# ttgir {fn.__name__} regs={getattr(ck, 'n_regs', '?')} spills={getattr(ck, 'n_spills', '?')} "
                      f"stages={ck.metadata.num_stages} warps={ck.metadata.num_warps} {tag} {counts}", flush=True)


def main() -> None:
    import kernels  # bench/ is sys.path[0]

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="tc_small.json")
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--ms", default=None)
    ap.add_argument("--tc", default=None)
    ap.add_argument("--fp8", default=None)
    ap.add_argument("--gl", default=None)
    ap.add_argument("--rep-ms", type=int, default=20)
    ap.add_argument("--ttgir", action="store_true")
    a = ap.parse_args()
    for arg, target in ((a.shapes, SHAPES), (a.ms, MS), (a.tc, TC), (a.fp8, FP8), (a.gl, GL)):
        if arg is not None:
            target[:] = ast.literal_eval(arg)
    kernels.REP_MS = a.rep_ms
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    precompile("_tc_small_sweep", _variants(), workers=15)
    cells = Cells(kernels.time_us)
    for k, n in SHAPES:
        fns = kernels.build("bf16", k, n)[0]
        for m in MS:
            cells.timed("bf16", k, n, m, None, fns, torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        del fns
        for kind, cfgs in KINDS.items():
            if not cfgs:
                continue
            nbytes = n * k // 2 if kind.endswith("_w4") else n * k
            ws = [_weights(kind, n, k, i) for i in range(kernels.copies_for(nbytes))]
            for m in MS:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = _reference64(kind, x, ws[0])
                for cfg in cfgs:
                    cells.timed(kind, k, n, m, cfg,
                                [lambda x, wt=wt, c=cfg, kd=kind: _call(kd, c, x, wt) for wt in ws], x, ref)
                del ref
            del ws
            torch.cuda.empty_cache()
        cells.save(a.json)
    cells.report()
    for r in cells.res:  # % of the 3.0 TB/s copy ceiling: weights + fp32 scales (+ x, y)
        k, n, m = r["k"], r["n"], r["m"]
        wb = {"bf16": 2 * n * k, "tc_w4": n * k // 2 + 8 * n * k // 128, "gl_w4": n * k // 2 + 8 * n * k // 128,
              "swap_fp8_tok": n * k + 4 * n}[r["kind"]]
        r["copy_pct"] = 100 * (wb + 2 * m * (k + n)) / (r["us"] * 1e-6) / 3.0e12
    cells.save(a.json)
    if a.ttgir:
        _ttgir_summary()


if __name__ == "__main__":
    main()
