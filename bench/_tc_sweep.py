"""Tile sweep of the M = 17..256 tensor-core paths (`tc_wna16` W4A16/W8A16, `swap_fp8` W8A8 / fp8
weight-only with BM-row tiles) at the Llama-3.1-8B shapes, batch 32/64/128/256.

Run from bench/kernels.py (`--rows-sweep out.json`). Variants are compiled first in parallel worker
processes (fills the on-disk Triton cache), then timed one by one here as CUDA-graph replays over weight
copies that overflow the L2 (`kernels.time_us`), next to bf16 cuBLAS of the same run. Every variant is
checked against the dequantized weight (fake-quantized activations for W8A8) before it is timed. Prints
the best config per (kind, K, N, M) with its ratio to bf16, as the tuples `_TILES` / `_ROW_TILES` store.
"""

from __future__ import annotations

import sys

import torch
from _sweep_common import Cells, precompile  # bench/ is sys.path[0]

SHAPES = [(8192, 8192), (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
MS = [32, 64, 128, 256]
FP8 = torch.float8_e4m3fn
# tc_wna16: TcConfig(block_n, block_k, split_k, num_warps, num_stages, waves, swap, block_m)
TC_CFGS = {
    32: [(64, 128, 0, 4, 3, 4, True, 32), (128, 128, 0, 4, 3, 2, True, 32), (64, 128, 0, 4, 4, 2, True, 32),
         (128, 128, 0, 8, 3, 2, False, 32)],
    64: [(64, 128, 0, 4, 3, 4, True, 64), (128, 128, 0, 4, 3, 2, True, 64), (128, 128, 0, 8, 3, 2, False, 64),
         (128, 128, 0, 4, 3, 2, True, 32)],
    128: [(128, 128, 0, 4, 3, 2, True, 64), (128, 128, 0, 8, 3, 2, False, 128), (64, 128, 0, 4, 3, 2, True, 128),
          (256, 128, 0, 8, 3, 1, False, 64)],
    256: [(128, 128, 0, 8, 3, 2, False, 128), (256, 128, 0, 8, 3, 1, False, 128), (128, 128, 0, 4, 3, 2, True, 64),
          (128, 128, 0, 8, 4, 1, False, 128)],
}
# swap_fp8: SwapFp8Config(block_n, block_k, waves, num_warps, num_stages, block_m)
SWAP_CFGS = {
    32: [(64, 128, 4, 4, 3, 32), (128, 128, 2, 4, 3, 32), (64, 256, 4, 4, 3, 32), (128, 256, 2, 8, 3, 32)],
    64: [(64, 128, 4, 4, 3, 64), (128, 128, 2, 4, 3, 64), (128, 256, 2, 8, 3, 64), (64, 256, 4, 4, 3, 64)],
    128: [(128, 128, 2, 8, 3, 64), (128, 128, 2, 8, 3, 128), (128, 256, 1, 8, 3, 128), (64, 128, 4, 4, 3, 128)],
    256: [(128, 128, 2, 8, 3, 128), (128, 256, 1, 8, 3, 128), (256, 128, 1, 8, 3, 128), (128, 128, 2, 4, 3, 64)],
}
# kind -> (family, batch sizes); fp8 per-token goes to cuBLASLt from M = 64
KINDS = {"tc_w4": ("tc", MS), "tc_w8": ("tc", MS), "swap_int8_tok": ("swap", MS), "swap_fp8_blk": ("swap", MS),
         "swap_fp8_wonly": ("swap", MS), "swap_fp8_tok": ("swap", [32])}


# second round (`--rows-sweep out.json --rows-extra`): more tiles at M = 128/256 where round one stayed < bf16
EXTRA_TC = {
    128: [(64, 128, 0, 4, 4, 2, True, 128), (128, 128, 0, 8, 3, 2, True, 128), (64, 128, 0, 8, 3, 2, True, 128),
          (64, 64, 0, 4, 4, 2, True, 128), (32, 128, 0, 4, 3, 4, True, 128)],
    256: [(64, 128, 0, 4, 3, 2, True, 128), (128, 128, 0, 8, 3, 2, True, 128), (64, 128, 0, 8, 3, 2, True, 256),
          (128, 128, 0, 8, 3, 1, True, 256), (64, 128, 0, 4, 4, 2, True, 128)],
}
EXTRA_SWAP = {
    128: [(64, 128, 2, 4, 3, 128), (128, 128, 2, 8, 4, 128), (64, 256, 2, 4, 3, 128), (128, 128, 4, 8, 3, 128)],
    256: [(64, 128, 2, 4, 3, 128), (128, 128, 2, 8, 3, 256), (64, 128, 2, 8, 3, 256), (128, 128, 1, 8, 4, 128)],
}
EXTRA_KINDS = {"tc_w4": ("tc", [128, 256]), "tc_w8": ("tc", [128]), "swap_fp8_wonly": ("swap", [128, 256]),
               "swap_fp8_blk": ("swap", [128, 256])}


# third round (`--rows-sweep out.json --rows-round3`): W4A16 at 48 / 64 rows (the batch-64 int4 step), with the
# narrow one-program-per-SM tiles that won for codes_mm, register prefetch, 2 / 8 warps
ROUND3_TC = {m: [(32, 128, 0, 4, 3, 4, True, 64, 0), (32, 128, 0, 4, 4, 2, True, 64, 0), (32, 128, 0, 4, 3, 1, True, 64, 0),
                 (64, 128, 0, 4, 3, 4, True, 64, 1), (64, 128, 0, 4, 4, 2, True, 64, 1), (64, 128, 0, 4, 3, 1, True, 64, 0),
                 (64, 64, 0, 4, 4, 4, True, 64, 0), (32, 128, 0, 2, 3, 4, True, 64, 0), (64, 128, 0, 8, 3, 2, True, 64, 0),
                 (128, 128, 0, 8, 3, 2, True, 64, 1), (64, 128, 0, 4, 3, 4, True, 64, 0)] for m in (48, 64)}


def use_round3() -> None:
    """Switch this module to the third-round W4A16 tiles at 48 / 64 rows (in the compile workers too)."""
    TC_CFGS.update(ROUND3_TC)
    KINDS.clear()
    KINDS["tc_w4"] = ("tc", [48, 64])
    MS[:] = [48, 64]


def use_extra() -> None:
    """Switch this module to the second-round tile lists (also in the compile workers: set before spawn)."""
    TC_CFGS.update(EXTRA_TC)
    SWAP_CFGS.update(EXTRA_SWAP)
    KINDS.clear()
    KINDS.update(EXTRA_KINDS)
    MS[:] = [128, 256]


def _weights(kind: str, n: int, k: int, seed: int = 0) -> tuple:
    from quantrt.platforms.cuda.kernels.wna16 import pack_int_weight
    from quantrt.quant.weights import IntWeight

    g = torch.Generator(device="cuda").manual_seed(seed)
    if kind in ("tc_w4", "tc_w8"):
        bits, group = (4, 128) if kind == "tc_w4" else (8, k)
        codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), device="cuda", generator=g,
                              dtype=torch.int8)
        w = IntWeight(codes, torch.rand(n, k // group, device="cuda", generator=g) * 0.01 + 0.001, bits, group)
        return pack_int_weight(w, bits, None) + (group, bits)
    if kind == "swap_int8_tok":
        return (torch.randint(-127, 128, (n, k), device="cuda", generator=g, dtype=torch.int8),
                torch.rand(n, device="cuda", generator=g) * 0.01)
    data = (torch.randn(n, k, device="cuda", generator=g) * 100).clamp(-448, 448).to(FP8)
    if kind == "swap_fp8_blk":
        return data, torch.rand(n // 128, k // 128, device="cuda", generator=g) * 0.01
    return data, torch.rand(n, device="cuda", generator=g) * 0.01


_ACT = {"swap_int8_tok": 0, "swap_fp8_tok": 0, "swap_fp8_blk": 1, "swap_fp8_wonly": 3}


def _call(kind: str, cfg: tuple, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.platforms.cuda.kernels.swap_fp8 import SwapFp8Config, swap_fp8
    from quantrt.platforms.cuda.kernels.tc_wna16 import TcConfig, tc_wna16

    if kind.startswith("tc_"):
        packed, scale, zero, group, bits = wt
        return tc_wna16(x, packed, scale, zero, group, TcConfig(*cfg), bits=bits)
    data, sc = wt
    act = _ACT[kind]
    qmax = 127.0 if kind == "swap_int8_tok" else 1.0 if act == 3 else 448.0
    return swap_fp8(x, data, sc, act, 2 if kind == "swap_fp8_blk" else 1, qmax, None, SwapFp8Config(*cfg))


def _reference(kind: str, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.quant.quantize import quantize_act_per_token, quantize_act_per_token_group

    if kind.startswith("tc_"):
        packed, scale, zero, group, bits = wt
        pack = 32 // bits
        shifts = torch.arange(pack, device="cuda", dtype=torch.int32) * bits
        u = ((packed[:, None, :] >> shifts[None, :, None]) & (2**bits - 1)).reshape(-1, packed.shape[1]).float()
        w = (u - (zero - 2.0**23).repeat_interleave(group, 0)) * scale.repeat_interleave(group, 0)  # [K, N]
        return x.float() @ w
    data, sc = wt
    if kind == "swap_fp8_blk":
        w = data.float() * sc.repeat_interleave(128, 0).repeat_interleave(128, 1)
        q, sg = quantize_act_per_token_group(x, FP8, 128)
        return (q.float() * sg.repeat_interleave(128, 1)) @ w.t()
    w = data.float() * sc[:, None]
    if _ACT[kind] == 3:
        return x.float() @ w.t()
    q, sx = quantize_act_per_token(x, torch.int8 if kind == "swap_int8_tok" else FP8)
    return (q.float() * sx) @ w.t()


def _cfgs(kind: str) -> dict[int, list[tuple]]:
    return TC_CFGS if KINDS[kind][0] == "tc" else SWAP_CFGS


def _variants() -> list[tuple]:
    return [(kind, k, n, m, cfg) for k, n in SHAPES for kind, (_, ms) in KINDS.items() for m in ms
            for cfg in _cfgs(kind)[m]]


def sweep(out: str, rep_ms: int = 20, extra: bool | str = False) -> None:
    """`extra`: True for the second-round tiles, "use_round3" for the third."""
    import kernels  # bench/ is sys.path[0]

    kernels.REP_MS = rep_ms
    if extra:
        use_extra() if extra is True else globals()[extra]()
    precompile("_tc_sweep", _variants(), workers=15, extra=extra)
    cells = Cells(kernels.time_us)
    for k, n in SHAPES:
        cells.baselines(kernels.build, ("bf16",), k, n, MS)
        for kind, (_, ms) in KINDS.items():
            nbytes = n * k // 2 if kind == "tc_w4" else n * k
            cells.configs(sys.modules[__name__], kind, k, n, ms, _cfgs(kind), kernels.copies_for(nbytes))
        cells.save(out)
    cells.report()
