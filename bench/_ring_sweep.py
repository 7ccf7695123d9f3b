"""Sweep of the Gluon TMA-ring kernel `ring_wna16` (W4A16 g128, M <= 32) on the H100 next to bf16 cuBLAS,
torch's tinygemm and the W4A16 dispatch (`w4a16_g128`). (`ring_w8`, W8A8 on codes: `_frag_sweep.py --kernel ring`.)

    cd bench && python _ring_sweep.py --json ring.json [--shapes "[(8192, 8192)]"] [--ms "[1, 16]"] \
        [--cfgs "[(64, 128, 2, 4, 0, 8), ('default', 0)]"] [--kinds "['ring_w4z']"] [--baselines "['bf16']"]

Every config is checked against the float64 product (x @ the dequantized weight; fake-quantized activations
before it is timed (kernels.time_us: CUDA-graph replay over weight copies that overflow the L2).
`ring_w4` has symmetric weights (no zero array, the GPTQ-sym case), `ring_w4z` an asymmetric zero array.
Prints the best config per (kind, K, N, M), its ratio to bf16 and its share of the 3.0 TB/s copy ceiling.
"""

from __future__ import annotations

import sys

import torch
from _sweep_common import Cells, precompile, sweep_args  # bench/ is sys.path[0]

SHAPES = [(8192, 8192), (14336, 4096), (4096, 28672), (4096, 6144), (4096, 4096)]
MS = [1, 2, 8, 16]
# RingConfig(block_n, block_k, stages, waves, split_k, block_m[, pdl, x_vec, warps]); block_m 8 only runs at M <= 8
CFGS = [(64, 128, 4, 2, 0, 8), (64, 128, 6, 2, 0, 8), (64, 128, 8, 2, 0, 8), (64, 128, 6, 1, 0, 8),
        (64, 128, 6, 4, 0, 8), (64, 128, 8, 1, 0, 8), (128, 128, 4, 1, 0, 8), (128, 128, 6, 1, 0, 8),
        (64, 64, 8, 2, 0, 8), (64, 128, 6, 2, 0, 16), (64, 128, 8, 1, 0, 16), (128, 128, 4, 1, 0, 16)]
KINDS = ["ring_w4", "ring_w4z"]
BASELINES = ["bf16", "tinygemm", "w4a16_g128"]


def _weights(kind: str, n: int, k: int, seed: int = 0) -> tuple:
    from quantrt.platforms.cuda.kernels.wna16 import pack_int_weight
    from quantrt.quant.weights import IntWeight

    g = torch.Generator(device="cuda").manual_seed(seed)
    # fp16-valued scales, as GPTQ / AWQ store them: the compact weight the model holds (fp16 scales, uint8 zeros)
    scale = (torch.rand(n, k // 128, device="cuda", generator=g) * 0.01 + 0.001).half().float()
    if kind == "ring_w4z":
        codes = torch.randint(0, 16, (n, k), device="cuda", generator=g, dtype=torch.uint8)
        zero = torch.randint(0, 16, (n, k // 128), device="cuda", generator=g, dtype=torch.int32)
        return pack_int_weight(IntWeight(codes, scale, 4, 128, zero=zero), 4, None, compact=True)
    codes = torch.randint(-8, 8, (n, k), device="cuda", generator=g, dtype=torch.int8)
    return pack_int_weight(IntWeight(codes, scale, 4, 128), 4, None, compact=True)


def _call(kind: str, cfg: tuple, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    """cfg: RingConfig fields, or ("default", pdl) for the dispatch's tile with PDL on/off."""
    from dataclasses import replace

    from quantrt.platforms.cuda.kernels.ring_wna16 import RingConfig, default_config, ring_wna16

    packed, sc, z = wt
    if cfg and cfg[0] == "default":
        c = replace(default_config(x.shape[0], packed.shape[1], x.shape[1]), pdl=bool(cfg[1]))
    else:
        c = RingConfig(*cfg)
    return ring_wna16(x, packed, sc, z, 128, 8.0, c)


def _reference(kind: str, x: torch.Tensor, wt: tuple) -> torch.Tensor:
    from quantrt.platforms.cuda.kernels.ring_common import ring_reference

    packed, sc, z = wt
    return ring_reference(x, packed, sc, z, 128, 8.0).float()


def _cfgs_for(m: int) -> list[tuple]:
    return [c for c in CFGS if c[0] == "default" or m <= c[5]]


def _variants() -> list[tuple]:
    return [(kind, k, n, m, cfg) for k, n in SHAPES for kind in KINDS for m in MS for cfg in _cfgs_for(m)]


def main() -> None:
    import kernels  # bench/ is sys.path[0]

    a = sweep_args(__doc__, "ring.json", {"shapes": SHAPES, "ms": MS, "cfgs": CFGS, "kinds": KINDS,
                                          "baselines": BASELINES})
    kernels.REP_MS = a.rep_ms
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    precompile("_ring_sweep", _variants(), workers=15)
    cells = Cells(kernels.time_us)
    for k, n in SHAPES:
        cells.baselines(kernels.build, tuple(BASELINES), k, n, MS)
        for kind in KINDS:
            cells.configs(sys.modules[__name__], kind, k, n, MS, {m: _cfgs_for(m) for m in MS},
                          kernels.copies_for(n * k // 2))
        cells.save(a.json)
    cells.report()
    for r in cells.res:
        k, n, m = r["k"], r["n"], r["m"]
        if r["kind"] in ("bf16", "fp8_ch_tok"):
            wb = n * k * (2 if r["kind"] == "bf16" else 1)
        else:
            wb = n * k // 2 + n * k // 128 * (3 if r["kind"] == "ring_w4z" else 2)   # fp16 scales (+ uint8 zeros)
        r["copy_pct"] = round(100 * (wb + 2 * m * (k + n)) / (r["us"] * 1e-6) / 3.0e12, 1)
    best: dict = {}
    for r in cells.res:
        key = (r["kind"], r["k"], r["n"], r["m"])
        if r["err"] < 2e-2 and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    print("| kind | K | N | M | us | % copy |")
    for key in sorted(best):
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {best[key]['us']:.2f} | {best[key]['copy_pct']} |")
    cells.save(a.json)


if __name__ == "__main__":
    main()
