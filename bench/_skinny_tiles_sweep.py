"""Correctness + tile sweep of the M <= 4 skinny GEMVs and the tiled kernels at M = 16 (`bench/kernels.py
--skinny-sweep out.json`, the second pass in docs/PERFORMANCE.md). Kept apart from kernels.py's main table.
"""

from __future__ import annotations

import json
import math

import torch
from kernels import FP8, PLATFORM, build, copies_for, fp8_weight, int_weight, time_us  # bench/ is sys.path[0]

from quantrt.platforms.cuda.kernels import TritonWNA16Kernel
from quantrt.quant.kernel import LinearSpec
from quantrt.quant.weights import ActScheme, IntWeight


def _targets(n_tiles: int, sms: int = 132) -> list[int]:
    """Explicit split-K values that give about 2, 4 and 8 programs per SM."""
    return sorted({max(1, math.ceil(t * sms / n_tiles)) for t in (2, 4, 8)})


def skinny_sweep(out: str, budget_s: float = 470.0) -> None:
    """Correctness + tile sweep of the skinny GEMV kernels (M <= 4) and the tiled kernels at M = 16.

    Shapes (K, N) = 8192², (4096, 28672), (14336, 4096); bf16 and tinygemm timed in the same run.
    Every config is checked against x.float() @ w_deq.t() before it is timed. Results go to `out` (JSON).
    """
    import time

    from quantrt.platforms.cuda.kernels.skinny_fp8 import SkinnyFp8Config, skinny_fp8
    from quantrt.platforms.cuda.kernels.skinny_wna16 import SkinnyConfig, skinny_wna16
    from quantrt.platforms.cuda.kernels.w8a8_triton import w8a8_matmul
    from quantrt.platforms.cuda.kernels.wna16_triton import WNA16Config, wna16_matmul

    t_end = time.time() + budget_s
    res: list[dict] = []

    def save() -> None:
        with open(out, "w") as f:
            json.dump(res, f, indent=0)

    def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
        return float((y.float() - ref).norm() / ref.norm()) if torch.isfinite(y).all() else float("inf")

    def run(kind: str, k: int, n: int, m: int, cfg: object, fns: list, ref: torch.Tensor, x: torch.Tensor) -> None:
        if time.time() > t_end:
            return
        try:
            err = rel(fns[0](x), ref)
            us = time_us([lambda f=f: f(x) for f in fns])
        except Exception as e:  # noqa: BLE001
            print(f"# {kind} {k}x{n} m={m} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            return
        res.append(dict(kind=kind, k=k, n=n, m=m, cfg=str(cfg), us=us, err=err))
        print(f"{kind:14s} {k:5d}x{n:5d} m={m:2d} {us:7.2f}us err={err:.1e} {cfg}", flush=True)

    shapes = [(8192, 8192), (4096, 28672), (14336, 4096)]
    for k, n in shapes:
        bf = build("bf16", k, n)[0]
        tg = build("tinygemm", k, n)[0]
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for name, fns in (("bf16", bf), ("tinygemm", tg)):
                try:
                    us = time_us([lambda f=f, x=x: f(x) for f in fns])
                    res.append(dict(kind=name, k=k, n=n, m=m, cfg="", us=us, err=0.0))
                    print(f"{name:14s} {k:5d}x{n:5d} m={m:2d} {us:7.2f}us", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"# {name}: {e}", flush=True)
        del bf, tg
        # ---- W4A16 g128 symmetric (and one asym/act-order + one W8 per-channel correctness check)
        wq = [int_weight(n, k, 4, 128) for _ in range(copies_for(n * k // 2))]
        kerns = [TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.bfloat16), PLATFORM) for w in wq]
        wdeq = wq[0].dequantize()
        n_t = {bn: math.ceil(n / bn) for bn in (64, 128, 256)}
        for m in (1, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ wdeq.t()
            if m == 1:  # (BN, BK, split, warps, stages, reduce); ~32 codes per thread
                cfgs = [SkinnyConfig(128, 256, 0, 4, 1, 2), SkinnyConfig(128, 256, 0, 4, 1, 1),
                        SkinnyConfig(64, 512, 0, 4, 1, 2), SkinnyConfig(128, 512, 0, 8, 1, 2),
                        SkinnyConfig(256, 256, 0, 8, 1, 2), SkinnyConfig(64, 256, 0, 4, 1, 2),
                        SkinnyConfig(128, 256, 0, 4, 3, 2), SkinnyConfig(32, 512, 0, 4, 1, 2)]
                cfgs += [SkinnyConfig(128, 256, sp, 4, 1, 2) for sp in _targets(n_t[128])]
            else:
                cfgs = [SkinnyConfig(64, 256, 0, 4, 1, 2), SkinnyConfig(64, 256, 0, 4, 1, 1),
                        SkinnyConfig(128, 256, 0, 8, 1, 2), SkinnyConfig(64, 128, 0, 4, 1, 2),
                        SkinnyConfig(128, 128, 0, 4, 1, 2), SkinnyConfig(32, 256, 0, 4, 1, 2),
                        SkinnyConfig(64, 512, 0, 8, 1, 2), SkinnyConfig(64, 256, 0, 4, 3, 2)]
                cfgs += [SkinnyConfig(64, 256, sp, 4, 1, 2) for sp in _targets(n_t[64])]
            for cfg in cfgs:
                run("skinny_w4", k, n, m, cfg, [lambda x, kk=kk, c=cfg: skinny_wna16(
                    x, kk.packed, kk.scale, None, 128, 4, c, zero_const=8) for kk in kerns], ref, x)
            save()
        x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ wdeq.t()
        for bn, bk, warps, stages in [(128, 256, 4, 2), (128, 512, 4, 2), (64, 1024, 4, 2), (128, 1024, 8, 2),
                                      (64, 512, 4, 3)]:
            cfg = WNA16Config(16, bn, bk, 0, warps, stages)
            run("tiled_w4", k, n, 16, cfg, [lambda x, kk=kk, c=cfg: wna16_matmul(
                x, kk.packed, kk.scale, kk.zero, 128, 4, c, zero_const=kk.zero_const) for kk in kerns], ref, x)
        save()
        del kerns, wq
        torch.cuda.empty_cache()
        # correctness of other int layouts through apply() (asym + act-order, W8 per-channel, 3-bit)
        gen = torch.Generator(device="cuda").manual_seed(0)
        for bits, group, asym, act in [(4, 128, True, True), (8, k, False, False), (8, k, True, False),
                                       (3, 64, False, False), (4, 32, True, False)]:
            g = k // group
            if asym:
                codes = torch.randint(0, 2**bits, (n, k), device="cuda", generator=gen).to(torch.uint8)
                zero = torch.randint(0, 2**bits, (n, g), device="cuda", generator=gen).to(torch.int32)
            else:
                codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), device="cuda",
                                      generator=gen).to(torch.int8)
                zero = None
            g_idx = (torch.randperm(k, device="cuda", generator=gen) // group).to(torch.int32) if act else None
            w = IntWeight(codes, torch.rand(n, g, device="cuda", generator=gen) * 0.01 + 0.001, bits, group,
                          zero=zero, g_idx=g_idx)
            kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.bfloat16), PLATFORM)
            for m in (1, 3, 4):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                err = rel(kern.apply(x, None), x.float() @ w.dequantize().t())
                res.append(dict(kind=f"check_int{bits}_g{group}_asym{int(asym)}_act{int(act)}", k=k, n=n, m=m,
                                cfg=kern.skinny_why, us=0.0, err=err))
                print(f"check int{bits} g{group} asym={asym} act={act} m={m}: err={err:.1e} {kern.skinny_why}",
                      flush=True)
            del kern, w
        save()
        # ---- FP8
        wf = [fp8_weight(n, k, "channel") for _ in range(copies_for(n * k))]
        fdeq = wf[0].data.float() * wf[0].scale[:, None]
        for m in (1, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ fdeq.t()
            if m == 1:
                cfgs = [SkinnyFp8Config(64, 256, 0, 4, 1, 2), SkinnyFp8Config(64, 256, 0, 4, 1, 1),
                        SkinnyFp8Config(32, 256, 0, 4, 1, 2), SkinnyFp8Config(64, 512, 0, 8, 1, 2),
                        SkinnyFp8Config(128, 256, 0, 8, 1, 2), SkinnyFp8Config(32, 512, 0, 4, 1, 2),
                        SkinnyFp8Config(16, 512, 0, 4, 1, 2), SkinnyFp8Config(64, 256, 0, 4, 3, 2)]
                cfgs += [SkinnyFp8Config(64, 256, sp, 4, 1, 2) for sp in _targets(n_t[64])]
            else:
                cfgs = [SkinnyFp8Config(32, 256, 0, 4, 1, 2), SkinnyFp8Config(32, 256, 0, 4, 1, 1),
                        SkinnyFp8Config(64, 256, 0, 8, 1, 2), SkinnyFp8Config(16, 512, 0, 4, 1, 2),
                        SkinnyFp8Config(32, 128, 0, 4, 1, 2), SkinnyFp8Config(64, 128, 0, 4, 1, 2),
                        SkinnyFp8Config(32, 256, 0, 8, 1, 2), SkinnyFp8Config(32, 256, 0, 4, 3, 2)]
                cfgs += [SkinnyFp8Config(32, 256, sp, 4, 1, 2) for sp in _targets(n_t[64] * 2)]
            for cfg in cfgs:
                run("skinny_fp8wo", k, n, m, cfg, [lambda x, w=w, c=cfg: skinny_fp8(
                    x, w.data, w.scale, 3, 1, 1.0, None, c) for w in wf], ref, x)
            for cfg in cfgs[:3]:  # W8A8 per-token: reference = fake-quantized x
                from quantrt.quant.quantize import quantize_act_per_token
                q, sx = quantize_act_per_token(x, FP8)
                refq = (q.float() * sx) @ fdeq.t()
                run("skinny_fp8tok", k, n, m, cfg, [lambda x, w=w, c=cfg: skinny_fp8(
                    x, w.data, w.scale, 0, 1, 448.0, None, c) for w in wf], refq, x)
            save()
        x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ fdeq.t()
        for blk in [(16, 64, 256, 4, 0), (16, 64, 512, 4, 0), (16, 128, 512, 8, 0), (16, 32, 512, 4, 0)]:
            run("tiled_fp8wo", k, n, 16, blk, [lambda x, w=w, b=blk: w8a8_matmul(
                x, w.data, w.scale, 3, 1, 1.0, None, b) for w in wf], ref, x)
        save()
        del wf
        torch.cuda.empty_cache()
    # best per (kind, shape, m) against bf16 of the same run
    base = {(r["k"], r["n"], r["m"]): r["us"] for r in res if r["kind"] == "bf16"}
    best: dict = {}
    for r in res:
        if r["us"] > 0 and r["err"] < 2e-2:
            key = (r["kind"], r["k"], r["n"], r["m"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    print("| kind | K | N | M | us | x bf16 | cfg |")
    for (kind, k, n, m), r in sorted(best.items(), key=lambda t: (t[0][1], t[0][2], t[0][3], t[0][0])):
        print(f"| {kind} | {k} | {n} | {m} | {r['us']:.2f} | {base.get((k, n, m), float('nan')) / r['us']:.2f} "
              f"| {r['cfg']} |")
    bad = [r for r in res if r["err"] >= 2e-2]
    print(f"# {len(bad)} configs failed the 2e-2 check:", [(r["kind"], r["m"], r["cfg"], r["err"]) for r in bad][:10])
    save()
