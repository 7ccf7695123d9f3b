"""Batch 2-16 sweep of the tensor-core tiles (seventh pass): `tc_wna16` W4A16 g128 with and without the next
K step prefetched into registers (`TcConfig.prefetch` 0/1) and `swap_fp8` per-token W8A8, next to bf16 cuBLAS
of the same run.

    cd bench && python _tc_small_sweep.py --json out.json [--shapes "[(8192, 8192)]"] [--ms "[2, 16]"]
        [--tc "[TcConfig tuples]"] [--fp8 "[SwapFp8Config tuples]"] [--ttgir]

Weights, calls and references are `_tc_sweep`'s (kinds tc_w4, swap_fp8_tok). Variants are compiled first in
parallel worker processes, then each is checked against x @ the dequantized weight (fake-quantized
activations for W8A8) and timed as a CUDA-graph replay over weight copies that overflow the L2
(`kernels.time_us`). A variant that fails the check is reported, not timed. `--ttgir` prints, per compiled
variant, how many cp.async copies, layout conversions and shared-memory allocations its TTGIR holds.
The variants the seventh pass measured slower (two steps prefetched, TMA word / weight tiles, the Gluon
fragment-order kernel) were removed; they and their sweep kinds are in git history (16c8ff1, 6c310fc,
19d465a; all three at c159575).
"""

from __future__ import annotations

import re
import sys

import torch
from _sweep_common import Cells, precompile, sweep_args  # bench/ is sys.path[0]
from _tc_sweep import _call, _reference, _weights  # noqa: F401 (the sweep-module contract of _sweep_common)

SHAPES = [(8192, 8192)]
MS = [2, 16]
# TcConfig(block_n, block_k, split_k, num_warps, num_stages, waves, swap, block_m, prefetch)
TC = [(64, 128, 0, 4, 3, 4, True, 16, 0), (64, 128, 0, 4, 3, 4, True, 16, 1),   # the M <= 16 tile, prefetch 0/1
      (64, 128, 0, 4, 3, 2, True, 16, 1), (64, 128, 0, 8, 3, 4, True, 16, 1), (128, 128, 0, 8, 3, 2, True, 16, 1),
      (64, 256, 0, 4, 3, 4, True, 16, 1), (64, 128, 0, 4, 3, 8, True, 16, 1)]
# SwapFp8Config(block_n, block_k, waves, num_warps, num_stages, block_m)
FP8 = [(64, 256, 1, 4, 3, 16),                      # the current 8192² tile
       (64, 256, 2, 4, 3, 16)]
KINDS = {"tc_w4": TC, "swap_fp8_tok": FP8}


def _variants() -> list[tuple]:
    return [(kind, k, n, m, cfg) for k, n in SHAPES for kind, cfgs in KINDS.items() for m in MS for cfg in cfgs]


def _ttgir_summary() -> None:
    from quantrt.platforms.cuda.kernels.swap_fp8 import _swap_fp8_kernel
    from quantrt.platforms.cuda.kernels.tc_wna16 import _tc_wna16_kernel

    for fn in (_tc_wna16_kernel, _swap_fp8_kernel):
        for cache in fn.device_caches.values():
            for key, ck in cache[0].items():
                src = ck.asm.get("ttgir", "")
                counts = {op: len(re.findall(op, src)) for op in (
                    "async_copy_global_to_local", "convert_layout", "local_alloc", "warp_group_dot ")}
                try:
                    names = ck.src.fn.arg_names
                    tag = {names[i[0]]: v for i, v in ck.src.constants.items()
                           if names[i[0]] in ("BN", "BK", "PREFETCH", "SPLIT", "BM")}
                except Exception:  # noqa: BLE001
                    tag = str(key)[-120:]
                print(f"# ttgir {fn.__name__} regs={getattr(ck, 'n_regs', '?')} spills={getattr(ck, 'n_spills', '?')} "
                      f"stages={ck.metadata.num_stages} warps={ck.metadata.num_warps} {tag} {counts}", flush=True)


def main() -> None:
    import kernels  # bench/ is sys.path[0]

    a = sweep_args(__doc__, "tc_small.json", {"shapes": SHAPES, "ms": MS, "tc": TC, "fp8": FP8}, ("ttgir",))
    kernels.REP_MS = a.rep_ms
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    precompile("_tc_small_sweep", _variants(), workers=15)
    cells = Cells(kernels.time_us)
    for k, n in SHAPES:
        cells.baselines(kernels.build, ("bf16",), k, n, MS)
        for kind, cfgs in KINDS.items():
            if cfgs:
                nbytes = n * k // 2 if kind == "tc_w4" else n * k
                cells.configs(sys.modules[__name__], kind, k, n, MS, cfgs, kernels.copies_for(nbytes))
        cells.save(a.json)
    cells.report()
    for r in cells.res:  # % of the 3.0 TB/s copy ceiling: weights + fp32 scales (+ x, y)
        k, n, m = r["k"], r["n"], r["m"]
        wb = {"bf16": 2 * n * k, "tc_w4": n * k // 2 + 8 * n * k // 128, "swap_fp8_tok": n * k + 4 * n}[r["kind"]]
        r["copy_pct"] = 100 * (wb + 2 * m * (k + n)) / (r["us"] * 1e-6) / 3.0e12
    cells.save(a.json)
    if a.ttgir:
        _ttgir_summary()


if __name__ == "__main__":
    main()
