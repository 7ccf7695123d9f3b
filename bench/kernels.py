"""Linear-kernel microbenchmark on a CUDA GPU: quantrt's Triton kernels vs torch peers.

Llama-3.1-8B layer shapes (K, N) and batch 1..256. Every entry is timed as a CUDA graph replay
(`triton.testing.do_bench_cudagraph`, median) over several weight copies in turn so that small
weights are not served from the 50 MB L2. Prints µs, achieved GB/s (weight + activation + output
bytes), % of the copy ceiling and speed-up over bf16 cuBLAS (F.linear).

    python bench/kernels.py [--quick] [--json out.json] [--tune out.json]
    python bench/kernels.py --peers --rep-ms 20 --json peers.json   # + gemlite/torchao peers (_peers.py)
    python bench/kernels.py --fp4-moe-attn   # NVFP4/MXFP4 8192² bs1-16, fused MoE, paged decode attention
    python bench/kernels.py --fp8-sweep out.json --fp8-cube   # M <= 16 fp8 tiles; fp8 vs cuBLAS at 8192³
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _peers import PEERS, TOL, PeerSkipped, build_peer, peer_versions  # bench/ is on sys.path

from quantrt.platform.interface import DeviceCapability
from quantrt.platforms.cuda.kernels import TritonFp4Kernel, TritonW8A8Kernel, TritonWNA16Kernel
from quantrt.platforms.cuda.platform import CudaPlatform
from quantrt.quant.kernel import LinearSpec
from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, IntWeight, MicroWeight, ScaleGranularity

SHAPES = [(8192, 8192), (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
COPY_CEILING = 3.0e12  # bytes/s, measured device-to-device copy on the H100 (read + write)
L2_BYTES = 50 * 2**20
PLATFORM = CudaPlatform(capability=DeviceCapability(9, 0))
FP8 = torch.float8_e4m3fn
REP_MS = 40


def copies_for(nbytes: int) -> int:
    """Weight copies to cycle through so the working set is at least 4x the L2."""
    return max(1, min(16, math.ceil(4 * L2_BYTES / nbytes)))


def time_us(fns: list[Callable[[], object]], rep_ms: float | None = None) -> float:
    """Median µs of one call, over a graph that calls every fn (one per weight copy) once, replayed for
    `rep_ms` ms (default REP_MS, this script's --rep-ms; the tile sweeps pass their own)."""
    import triton.testing

    def run() -> None:
        for f in fns:
            f()

    rep = REP_MS if rep_ms is None else rep_ms
    return triton.testing.do_bench_cudagraph(run, rep=rep, return_mode="median") * 1e3 / len(fns)


def int_weight(n: int, k: int, bits: int, group: int, asym: bool = False) -> IntWeight:
    """Random codes with fp16-valued scales, as GPTQ / AWQ store them: symmetric (signed codes), or (asym, AWQ)
    unsigned codes with an integer zero point per group."""
    scale = (torch.rand(n, k // group, device="cuda") * 0.01 + 0.001).half().float()
    if asym:
        codes = torch.randint(0, 2 ** bits, (n, k), device="cuda", dtype=torch.uint8)
        zero = torch.randint(0, 2 ** bits, (n, k // group), device="cuda", dtype=torch.int32)
        return IntWeight(codes, scale, bits, group, zero=zero)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), device="cuda", dtype=torch.int8)
    return IntWeight(codes, scale, bits, group)


def offset_weight(n: int, k: int, group: int) -> IntWeight:
    """4-bit unsigned codes with float offsets per group (GGUF Q4_1 / K-quant mins, torchao int4wo): q * s + o."""
    codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8)
    scale = torch.rand(n, k // group, device="cuda") * 0.01 + 0.001
    return IntWeight(codes, scale, 4, group, offset=-(torch.rand_like(scale) * 8 + 4) * scale)


def fp8_weight(n: int, k: int, gran: str) -> FloatWeight:
    data = (torch.randn(n, k, device="cuda") * 100).clamp(-448, 448).to(FP8)  # no NaN codes
    if gran == "block":
        return FloatWeight(data, torch.rand(n // 128, k // 128, device="cuda") * 0.01, ScaleGranularity.BLOCK,
                           (128, 128))
    return FloatWeight(data, torch.rand(n, device="cuda") * 0.01, ScaleGranularity.CHANNEL)


def _wna16_kernels(make: Callable[[], IntWeight]) -> tuple[list[Callable[[torch.Tensor], torch.Tensor]], int]:
    """Prepared W4A16/W8A16 kernels over enough weight copies (from `make`) and the bytes one call streams: the
    words, the scales, and the zero / float-offset array where one is read (symmetric weights use a constant
    zero), plus the residual offsets of the split path."""
    kerns = [TritonWNA16Kernel.prepare(LinearSpec(make(), ActScheme(), torch.bfloat16), PLATFORM)]
    k0 = kerns[0]
    arrays = [k0.packed, k0.scale] + ([k0.zero] if k0.zero is not None else [])
    arrays += [k0.offset] if k0.offset is not None else []
    nbytes = sum(t.numel() * t.element_size() for t in arrays)
    kerns += [TritonWNA16Kernel.prepare(LinearSpec(make(), ActScheme(), torch.bfloat16), PLATFORM)
              for _ in range(copies_for(nbytes) - 1)]
    return [lambda x, kk=kk: kk.apply(x, None) for kk in kerns], nbytes


def build(name: str, k: int, n: int) -> tuple[list[Callable[[torch.Tensor], torch.Tensor]], int]:
    """One callable per weight copy for `name`, and the weight bytes one call reads."""
    if name == "bf16":
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        nbytes = w.numel() * 2
        ws = [w] + [w.clone() for _ in range(copies_for(nbytes) - 1)]
        return [lambda x, w=w: F.linear(x, w) for w in ws], nbytes
    if name == "tinygemm":
        nbytes = n * k // 2 + n * (k // 128) * 4
        fns = []
        for _ in range(copies_for(nbytes)):
            u8 = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
            packed = torch._convert_weight_to_int4pack(u8, 8)
            sz = torch.rand(k // 128, n, 2, device="cuda", dtype=torch.bfloat16)
            fns.append(lambda x, p=packed, s=sz: torch._weight_int4pack_mm(x, p, 128, s))
        return fns, nbytes
    if name == "scaled_mm":  # cuBLASLt fp8 rowwise, activations already quantized (kernel only)
        nbytes = n * k + n * 4
        fns = []
        for _ in range(copies_for(nbytes)):
            w = (torch.randn(n, k, device="cuda") * 100).clamp(-448, 448).to(FP8)
            sb = torch.rand(1, n, device="cuda")
            fns.append(lambda x, w=w, sb=sb: torch._scaled_mm(
                x.to(FP8), w.t(), scale_a=torch.ones(x.shape[0], 1, device="cuda"), scale_b=sb,
                out_dtype=torch.bfloat16))
        return fns, nbytes
    if name in ("w4a16_g128", "w8a16_ch", "w4a16_g32", "w8a16_g32"):   # symmetric codes
        bits, group = {"w4a16_g128": (4, 128), "w4a16_g32": (4, 32), "w8a16_g32": (8, 32)}.get(name, (8, k))
        return _wna16_kernels(lambda: int_weight(n, k, bits, group))
    if name == "w4a16_g128_asym":   # AWQ: zero points per group
        return _wna16_kernels(lambda: int_weight(n, k, 4, 128, asym=True))
    if name in ("w4a16_g128_offset", "w4a16_g32_offset"):  # float offsets (GGUF mins, torchao int4wo)
        return _wna16_kernels(lambda: offset_weight(n, k, 128 if "g128" in name else 32))
    if name in ("fp8_ch_tok", "fp8_blk_grp", "fp8_wonly"):
        gran = "block" if name == "fp8_blk_grp" else "channel"
        act = {"fp8_ch_tok": ActScheme(ActKind.DYNAMIC_TOKEN, FP8),
               "fp8_blk_grp": ActScheme(ActKind.DYNAMIC_GROUP, FP8, group=128), "fp8_wonly": ActScheme()}[name]
        nbytes = n * k
        kerns = [TritonW8A8Kernel.prepare(LinearSpec(fp8_weight(n, k, gran), act, torch.bfloat16), PLATFORM)
                 for _ in range(copies_for(nbytes))]
        return [lambda x, kk=kk: kk.apply(x, None) for kk in kerns], nbytes
    if name == "int8_ch_tok":
        nbytes = n * k
        kerns = []
        for _ in range(copies_for(nbytes)):
            w = IntWeight(torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8),
                          torch.rand(n, 1, device="cuda") * 0.01, 8, k)
            kerns.append(TritonW8A8Kernel.prepare(LinearSpec(w, ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8),
                                                             torch.bfloat16), PLATFORM))
        return [lambda x, kk=kk: kk.apply(x, None) for kk in kerns], nbytes
    if name in ("nvfp4", "mxfp4"):
        block = 16 if name == "nvfp4" else 32
        nbytes = n * k // 2 + n * k // block
        kerns = [TritonFp4Kernel.prepare(LinearSpec(fp4_weight(n, k, name), ActScheme(), torch.bfloat16), PLATFORM)
                 for _ in range(copies_for(nbytes))]
        return [lambda x, kk=kk: kk.apply(x, None) for kk in kerns], nbytes
    raise ValueError(name)


def fp4_weight(n: int, k: int, kind: str) -> MicroWeight:
    """Random NVFP4 (e4m3 block-16 scales + global scale) or MXFP4 (e8m0 block-32 scales) weight."""
    codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8)
    if kind == "mxfp4":
        return MicroWeight(codes, torch.exp2(torch.randint(-8, 0, (n, k // 32), device="cuda").float()), 32)
    sc = (torch.rand(n, k // 16, device="cuda") * 400 + 1).to(FP8).float()
    return MicroWeight(codes, sc, 16, torch.tensor(1e-4, device="cuda"))


KERNELS = ["bf16", "tinygemm", "w4a16_g128", "w4a16_g128_asym", "w8a16_ch", "scaled_mm", "fp8_ch_tok", "fp8_blk_grp",
           "fp8_wonly", "int8_ch_tok", "w4a16_g32", "w4a16_g128_offset", "w4a16_g32_offset", "w8a16_g32"]


def bench(shapes: list[tuple[int, int]], batches: list[int], kernels: list[str],
          json_path: str | None = None) -> list[dict]:
    """Time every kernel (ours, torch's, and the optional peers of _peers.py) at every shape and batch.

    A peer that cannot run here gets one row {"skipped": reason}; a peer whose output is off its
    dequantized reference gets {"wrong": True, "err": ...} for that batch and is not timed. With
    `json_path` the rows are written after every (shape, kernel), so a run cut short keeps what it had.
    """
    rows: list[dict] = []
    for k, n in shapes:
        for name in kernels:
            peer, t0 = None, time.time()
            try:
                if name in PEERS:
                    peer = build_peer(name, k, n, copies_for)
                    fns, wbytes = peer.fns, peer.nbytes
                else:
                    fns, wbytes = build(name, k, n)
            except PeerSkipped as e:
                print(f"# skip {name} {k}x{n}: {e}", file=sys.stderr, flush=True)
                rows.append(dict(k=k, n=n, m=None, kernel=name, skipped=str(e)))
                continue
            except Exception as e:  # a peer missing on this torch build
                print(f"# {name} {k}x{n}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            print(f"# {name} {k}x{n}: built {len(fns)} copies in {time.time() - t0:.1f}s", file=sys.stderr)
            for m in batches:
                row: dict = dict(k=k, n=n, m=m, kernel=name)
                t0 = time.time()
                try:
                    x = torch.randn(m, k, device="cuda", dtype=peer.x_dtype if peer else torch.bfloat16)
                    if peer is not None:  # correctness first (also runs any autotuning outside the graph)
                        row["err"] = err = peer.rel_error(x)
                        if not err <= TOL:
                            print(f"# WRONG {name} {k}x{n} m={m}: rel. error {err:.2e} > {TOL:.0e} vs the "
                                  f"dequantized reference; not timed ({time.time() - t0:.1f}s)", file=sys.stderr,
                                  flush=True)
                            rows.append(dict(row, us=math.nan, gbs=math.nan, wrong=True))
                            continue
                    us = time_us([lambda f=f, x=x: f(x) for f in fns])
                except Exception as e:
                    print(f"# {name} {k}x{n} m={m}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
                    if "capture" in str(e):
                        rows.append(dict(row, us=math.nan, gbs=math.nan, failed=f"{type(e).__name__}: {e}"[:200]))
                        reset_after_failed_capture()
                    continue
                gbs = (wbytes + x.element_size() * m * (k + n)) / (us * 1e-6) / 1e9
                rows.append(dict(row, us=us, gbs=gbs))
                print(f"# {name} {k}x{n} m={m}: {us:.1f} us" + (f" err={row['err']:.1e}" if peer else "")
                      + f" ({time.time() - t0:.1f}s)", file=sys.stderr, flush=True)
            del fns, peer
            torch.cuda.empty_cache()
            if json_path:
                with open(json_path, "w") as f:
                    json.dump(rows, f, indent=1)
    add_ratios(rows)
    return rows


def reset_after_failed_capture() -> None:
    """A graph capture that failed mid-way leaves the CUDA generator in capture mode (the next randn raises
    'Offset increment outside graph capture'); one clean capture runs its epilogue and resets it."""
    try:
        torch.cuda.synchronize()
        g, z = torch.cuda.CUDAGraph(), torch.zeros(1, device="cuda")
        with torch.cuda.graph(g):
            z.add_(1)
        g.replay()
        torch.cuda.synchronize()
        print("# reset the CUDA generator after the failed capture", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 (the following cells then report their own errors)
        print(f"# reset after the failed capture failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)


def add_ratios(rows: list[dict]) -> None:
    """x_bf16 = bf16 cuBLAS µs / this row's µs, bf16 of the same run and (K, N, M)."""
    base = {(r["k"], r["n"], r["m"]): r["us"] for r in rows if r["kernel"] == "bf16"}
    for r in rows:
        b = base.get((r["k"], r["n"], r["m"]))
        r["x_bf16"] = b / r["us"] if b and r.get("us") else math.nan


def print_table(rows: list[dict]) -> None:
    """One markdown table per (K, N): cell = µs, speed-up over bf16, % of the copy ceiling; for a peer, the
    largest relative error against its dequantized reference over the batches in a last column."""
    batches = sorted({r["m"] for r in rows if r["m"] is not None})
    with_err = any("err" in r for r in rows)
    for (k, n), shape_rows in itertools.groupby(rows, key=lambda r: (r["k"], r["n"])):
        print(f"\n(K, N) = ({k}, {n})\n\n| kernel | " + " | ".join(f"bs{m}" for m in batches)
              + (" | max rel. err" if with_err else "") + " |")
        print("|---" * (len(batches) + 1 + with_err) + "|")
        for name, grp in itertools.groupby(shape_rows, key=lambda r: r["kernel"]):
            grp = list(grp)
            if "skipped" in grp[0]:
                print(f"| {name} | skipped: {grp[0]['skipped']} |")
                continue
            by_m = {r["m"]: r for r in grp}
            cells = []
            for m in batches:
                r = by_m.get(m)
                if r is None:
                    cells.append("-")
                elif r.get("wrong"):
                    cells.append(f"WRONG (err {r['err']:.1e})")
                elif r.get("failed"):
                    cells.append("graph capture failed")
                else:
                    cells.append(f"{r['us']:.1f} {r['x_bf16']:.2f}x {100 * r['gbs'] * 1e9 / COPY_CEILING:.0f}%")
            if with_err:
                errs = [r["err"] for r in grp if "err" in r]
                cells.append(f"{max(errs):.1e}" if errs else "")
            print(f"| {name} | " + " | ".join(cells) + " |")


def tune(out: str) -> None:
    """Sweep tile configs of the W4A16 and FP8 kernels at the shapes that set the targets."""
    import time

    from quantrt.platforms.cuda.kernels.w8a8_triton import w8a8_matmul
    from quantrt.platforms.cuda.kernels.wna16_triton import WNA16Config, wna16_matmul

    res: list[dict] = []
    deadline = time.time() + 330
    space = {1: ([1], [32, 64, 128], [256, 512, 1024], [4, 8], [0, 1], [1]),
             16: ([16], [32, 64, 128], [128, 256], [4], [0, 1], [2, 4]),
             64: ([64], [64, 128], [128, 256], [4, 8], [0, 1], [3])}
    for k, n in [(8192, 8192), (14336, 4096)]:
        kerns = [TritonWNA16Kernel.prepare(LinearSpec(int_weight(n, k, 4, 128), ActScheme(), torch.bfloat16),
                                           PLATFORM) for _ in range(copies_for(n * k // 2))]
        for m in (1, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for bm, bn, bk, warps, split, stages in itertools.product(*space[m]):
                if time.time() > deadline:
                    break
                cfg = WNA16Config(bm, bn, bk, split, warps, stages)
                try:
                    us = time_us([lambda kk=kk, c=cfg, x=x: wna16_matmul(x, kk.packed, kk.scale, kk.zero, 128, 4, c,
                                                                         zero_const=kk.zero_const)
                                  for kk in kerns])
                except Exception as e:
                    print(f"# tune {cfg}: {type(e).__name__}: {str(e)[:80]}", file=sys.stderr)
                    continue
                res.append(dict(kernel="w4a16", k=k, n=n, m=m, cfg=list(cfg.__dict__.values()), us=us))
            best = min((r for r in res if r["kernel"] == "w4a16" and (r["k"], r["n"], r["m"]) == (k, n, m)),
                       key=lambda r: r["us"], default=None)
            print(f"w4a16 {k}x{n} m={m}: best {best}", flush=True)
        del kerns
        wk = [fp8_weight(n, k, "channel") for _ in range(copies_for(n * k))]
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for bn, bk, warps, split in itertools.product([32, 64, 128], [128, 256], [4, 8], [0, 1]):
                if time.time() > deadline + 90:
                    break
                blk = (16, bn, bk, warps, split)
                try:
                    us = time_us([lambda w=w, b=blk, x=x: w8a8_matmul(x, w.data, w.scale, 0, 1, 448.0, None, b)
                                  for w in wk])
                except Exception as e:
                    print(f"# tune fp8 {blk}: {type(e).__name__}: {str(e)[:80]}", file=sys.stderr)
                    continue
                res.append(dict(kernel="fp8", k=k, n=n, m=m, cfg=list(blk), us=us))
            best = min((r for r in res if r["kernel"] == "fp8" and (r["k"], r["n"], r["m"]) == (k, n, m)),
                       key=lambda r: r["us"], default=None)
            print(f"fp8 {k}x{n} m={m}: best {best}", flush=True)
        del wk
        torch.cuda.empty_cache()
        with open(out, "w") as f:
            json.dump(res, f)


def main() -> None:
    global REP_MS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8192x8192 only, batches 1/16/64")
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"ours: {','.join(KERNELS)}; "
                    f"peers (gemlite/torchao wheels, optional): {','.join(PEERS)}")
    ap.add_argument("--peers", action="store_true", help="add every peer to --kernels")
    ap.add_argument("--shapes", default=None, help="KxN,KxN,... (default: the five Llama shapes)")
    ap.add_argument("--batches", default=None, help="M,M,... (default: 1-256)")
    ap.add_argument("--rep-ms", type=float, default=REP_MS, help="CUDA-graph replay time per measurement")
    ap.add_argument("--json", default=None, help="write the rows here (after every shape and kernel)")
    ap.add_argument("--table", default=None, help="print the tables of a --json file and exit (no GPU)")
    ap.add_argument("--tune", default=None, help="sweep tile configs and write them to this JSON file")
    ap.add_argument("--skinny-sweep", default=None, help="check + sweep the M <= 16 kernels into this JSON file")
    ap.add_argument("--fp8-sweep", default=None, help="sweep the M <= 16 fp8 tiles (swap_fp8, skinny_fp8) into this JSON")
    ap.add_argument("--rows-sweep", default=None, help="sweep the M = 32-256 tensor-core tiles (tc_wna16, swap_fp8) into this JSON")
    ap.add_argument("--rows-extra", action="store_true", help="with --rows-sweep: the second-round M = 128/256 tiles")
    ap.add_argument("--rows-round3", action="store_true", help="with --rows-sweep: the third-round W4A16 tiles at 48/64")
    ap.add_argument("--fp8-cube", action="store_true", help="fp8 per-token vs cuBLAS _scaled_mm and bf16 at 8192³")
    ap.add_argument("--fp4-moe-attn", action="store_true",
                    help="NVFP4/MXFP4 at 8192² bs1-16 vs bf16, fused MoE vs per-expert loop, decode attention vs SDPA")
    a = ap.parse_args()
    if a.table:
        with open(a.table) as f:
            rows = json.load(f)
        add_ratios(rows)
        print_table(rows)
        return
    REP_MS = a.rep_ms
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if a.fp4_moe_attn:
        from _fp4_moe_attn import run_all  # bench/ is sys.path[0] when run as a script

        print_table(bench([(8192, 8192)], [1, 2, 4, 8, 16], ["bf16", "nvfp4", "mxfp4"]))
        run_all()
        return
    if a.rows_sweep:
        from _tc_sweep import sweep as rows_sweep

        rows_sweep(a.rows_sweep, extra="use_round3" if a.rows_round3 else a.rows_extra)
        return
    if a.fp8_sweep or a.fp8_cube:
        from _skinny_sweep import cube, sweep

        if a.fp8_sweep:
            sweep(a.fp8_sweep)
        if a.fp8_cube:
            cube()
        return
    if a.tune:
        tune(a.tune)
        return
    if a.skinny_sweep:
        from _skinny_tiles_sweep import skinny_sweep

        skinny_sweep(a.skinny_sweep)
        return
    shapes, batches = ([(8192, 8192)], [1, 16, 64]) if a.quick else (SHAPES, BATCHES)
    if a.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    if a.batches:
        batches = [int(m) for m in a.batches.split(",")]
    kernels = a.kernels.split(",") + ([p for p in PEERS if p not in a.kernels.split(",")] if a.peers else [])
    print(f"# peers: {peer_versions()}", flush=True)
    rows = bench(shapes, batches, kernels, a.json)
    print_table(rows)


if __name__ == "__main__":
    main()
