"""CUDA benchmarks for the fused MoE and paged decode attention kernels (run by `bench/kernels.py --fp4-moe-attn`).

Fused MoE (Qwen3-30B-A3B shapes: 128 experts, top-8, hidden 2048, intermediate 768) at 1..256 tokens:
`triton_moe` (one launch per projection) vs the per-expert loop (`moe_reference` over bf16 experts: the
path without a fused kernel, one pair of GEMMs per active expert) and, for bf16, torch._grouped_mm.
Paged decode attention (Llama-3.1-8B: 32 q / 8 kv heads, d 128) at 4k and 32k context, batch 1 and 8:
the Triton kernel on bf16 / fp8 / fp4 pages vs what PagedAttention does without it (gather the slots,
then SDPA) and vs SDPA over contiguous bf16 K/V (no paging: the flash/efficient kernel's best case).
Times are medians of `triton.testing.do_bench` (eager calls; the 256 MB L2 flush before each run also hides
host launch overhead shorter than itself, ~85 us), or of CUDA-graph replays where a row says "(graph)";
GB/s = KV bytes read / time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantrt.engine.kv_pool import KVPool
from quantrt.engine.kv_quant import resolve_kv_cache_dtype
from quantrt.layers.moe.experts import GroupedMoEKernel, moe_reference
from quantrt.platform.interface import DeviceCapability
from quantrt.platforms.cuda.kernels.moe import TritonMoEKernel
from quantrt.platforms.cuda.kernels.paged_attention_triton import kv_format, paged_decode_attention
from quantrt.platforms.cuda.platform import CudaPlatform
from quantrt.quant.moe_kernel import MoESpec
from quantrt.quant.weights import (
    WEIGHT_ONLY,
    DenseWeight,
    FloatWeight,
    IntWeight,
    MicroWeight,
    ScaleGranularity,
)

PLATFORM = CudaPlatform(capability=DeviceCapability(9, 0))
COPY_CEILING = 3.0e12


def _us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def _us_graph(fn) -> float:
    """Median of CUDA-graph replays (no host launch cost, no L2 flush)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3


def _expert_weight(scheme: str, n: int, k: int):
    if scheme == "bf16":
        return DenseWeight(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05)
    if scheme == "fp8_blk128":
        data = (torch.randn(n, k, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        return FloatWeight(data, torch.rand(-(-n // 128), k // 128, device="cuda") * 1e-3, ScaleGranularity.BLOCK,
                           (128, 128))
    if scheme == "int4_g128":
        codes = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
        return IntWeight(codes, torch.rand(n, k // 128, device="cuda") * 0.01, 4, 128)
    if scheme == "mxfp4":
        codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8)
        return MicroWeight(codes, torch.exp2(torch.randint(-9, -5, (n, k // 32), device="cuda").float()), 32)
    raise ValueError(scheme)


def _moe_rows(scheme: str, tokens: tuple[int, ...], e: int, topk: int, h: int, i: int) -> dict[str, list[str]]:
    """Cells per implementation for one expert scheme."""
    experts = tuple((_expert_weight(scheme, i, h), _expert_weight(scheme, i, h), _expert_weight(scheme, h, i))
                    for _ in range(e))
    spec = MoESpec(experts, ((WEIGHT_ONLY,) * 3,) * e, h, i, torch.bfloat16)
    fused = TritonMoEKernel.prepare(spec, PLATFORM)
    w13 = torch.stack([torch.cat([g.dequantize(torch.bfloat16), u.dequantize(torch.bfloat16)])
                       for g, u, _ in experts])                                        # [E, 2I, H]
    w2 = torch.stack([d.dequantize(torch.bfloat16) for _, _, d in experts])            # [E, H, I]

    def loop(x, w, ids):
        return moe_reference(x, w.to(x.dtype), ids, e, lambda j: (w13[j], w2[j]))

    impls = {"triton_moe": fused.apply, "triton_moe (graph)": fused.apply, "per-expert loop": loop}
    if scheme == "bf16":
        impls["grouped_mm"] = GroupedMoEKernel(w13, w2).apply
    wbytes = {"bf16": 2.0, "fp8_blk128": 1.0, "int4_g128": 0.5 + 4 / 128, "mxfp4": 0.5 + 1 / 32}[scheme]
    cells: dict[str, list[str]] = {name: [] for name in impls}
    for t in tokens:
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        w, ids = torch.topk(torch.softmax(torch.randn(t, e, device="cuda"), -1), topk)
        moved = int(torch.unique(ids).numel()) * 3 * h * i * wbytes                  # active experts' weights
        ref = None
        for name, fn in impls.items():
            try:
                y = fn(x, w, ids)
                ref = y if ref is None else ref
                err = float((y.float() - ref.float()).norm() / ref.float().norm())
                timer = _us_graph if name.endswith("(graph)") else _us
                us = timer(lambda fn=fn, x=x, w=w, ids=ids: fn(x, w, ids))
                cells[name].append(f"{us:.0f}us {100 * moved / (us * 1e-6) / COPY_CEILING:.0f}%"
                                   + (f" err{err:.0e}" if err > 2e-2 else ""))
            except Exception as ex:  # noqa: BLE001 - a peer missing on this torch build
                cells[name].append(f"n/a ({type(ex).__name__})")
    return cells


def bench_moe(schemes=("bf16", "fp8_blk128", "int4_g128", "mxfp4"), tokens=(1, 16, 64, 256), e=128, topk=8,
              h=2048, i=768) -> None:
    print(f"\n## fused MoE: {e} experts, top-{topk}, hidden {h}, intermediate {i} (bf16 activations)")
    print("| scheme | impl | " + " | ".join(f"T={t}" for t in tokens) + " |")
    print("|---|---|" + "---|" * len(tokens))
    for scheme in schemes:
        for name, c in _moe_rows(scheme, tokens, e, topk, h, i).items():
            print(f"| {scheme} | {name} | " + " | ".join(c) + " |", flush=True)
        torch.cuda.empty_cache()
    print("(% = weight bytes of the active experts / time, over the 3.0 TB/s copy ceiling)")


def _fill(pool: KVPool) -> None:
    for t in (pool.k[0], pool.v[0], *pool.k_sc, *pool.v_sc):
        if t.dtype == torch.uint8:  # fp8 bits / fp4 codes / scale bytes without NaN codes
            t.copy_(torch.randint(0, 120, t.shape, device="cuda", dtype=torch.uint8))
        else:
            t.copy_(torch.randn(t.shape, device="cuda", dtype=t.dtype))


def _attn_cells(b: int, ctx: int, h: int, hkv: int, d: int) -> dict[tuple[str, str], str]:
    slots = b * ctx
    q = torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16)
    kv_slots = torch.randperm(slots, device="cuda").view(b, ctx)                        # scattered slots
    lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    out: dict[tuple[str, str], str] = {}
    for kv in ("bf16", "fp8_e4m3", "fp4_e2m1"):
        pool = KVPool(1, slots, hkv, d, resolve_kv_cache_dtype(kv, torch.bfloat16, PLATFORM), torch.device("cuda"))
        _fill(pool)
        fmt, _ = kv_format(pool)
        nbytes = pool.nbytes()
        k_sc = pool.k_sc[0] if pool.k_sc else None
        v_sc = pool.v_sc[0] if pool.v_sc else None

        def triton_fn(pool=pool, fmt=fmt, k_sc=k_sc, v_sc=v_sc):
            return paged_decode_attention(q, pool.k[0], pool.v[0], kv_slots, lens, d ** -0.5, fmt,
                                          k_sc=k_sc, v_sc=v_sc)

        fns = {"triton": triton_fn}
        if kv == "bf16":
            kc = torch.randn(b, hkv, ctx, d, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)

            def gather_sdpa(pool=pool):
                kk, vv = pool.gather(0, kv_slots)                                      # [B, L, Hkv, D]
                return F.scaled_dot_product_attention(q.unsqueeze(2), kk.transpose(1, 2), vv.transpose(1, 2),
                                                      scale=d ** -0.5, enable_gqa=True)

            def contiguous(kc=kc, vc=vc):
                return F.scaled_dot_product_attention(q.unsqueeze(2), kc, vc, scale=d ** -0.5, enable_gqa=True)

            fns["gather+SDPA (PagedAttention)"] = gather_sdpa
            fns["SDPA contiguous"] = contiguous
        for name, fn in fns.items():
            try:
                us = _us(fn)
                out[(name, kv)] = f"{us:.0f}us {nbytes / (us * 1e-6) / 1e9:.0f}GB/s"
            except Exception as ex:  # noqa: BLE001
                out[(name, kv)] = f"n/a ({type(ex).__name__})"
        torch.cuda.empty_cache()
    return out


def bench_attention(ctxs=(4096, 32768), batches=(1, 8), h=32, hkv=8, d=128) -> None:
    print(f"\n## paged decode attention: {h} q / {hkv} kv heads, d {d}, one query token per sequence")
    cols = [(b, c) for b in batches for c in ctxs]
    print("| impl | KV | " + " | ".join(f"B={b} ctx={c}" for b, c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    cells = [_attn_cells(b, c, h, hkv, d) for b, c in cols]
    for key in cells[0]:
        print(f"| {key[0]} | {key[1]} | " + " | ".join(c.get(key, "") for c in cells) + " |", flush=True)
    print("(GB/s = KV bytes of the batch, scales included, / time; copy ceiling 3000 GB/s)")


def run_all() -> None:
    import traceback

    for section in (bench_moe, bench_attention, sweep_fp4):
        try:
            section()
        except Exception:  # noqa: BLE001 - one section failing still prints the other
            traceback.print_exc()


def sweep_fp4(n: int = 8192, k: int = 8192) -> None:
    """Tile configs of the fp4 kernel at M = 1 / 4 / 16 (NVFP4 and MXFP4), to pick `fp4_triton.default_config`."""
    from quantrt.platforms.cuda.kernels.fp4 import TritonFp4Kernel
    from quantrt.platforms.cuda.kernels.fp4_triton import Fp4Config, fp4_matmul
    from quantrt.quant.kernel import LinearSpec

    print(f"\n## fp4 tile sweep {k}x{n} (us; bytes over the copy ceiling)")
    swapped = [Fp4Config(16, 64, 256, 0, 4, 3, 4, True), Fp4Config(16, 64, 128, 0, 4, 3, 4, True),
               Fp4Config(16, 128, 128, 0, 4, 3, 4, True), Fp4Config(16, 128, 128, 0, 8, 3, 4, True),
               Fp4Config(16, 64, 256, 0, 4, 3, 8, True), Fp4Config(16, 32, 256, 0, 4, 3, 4, True)]
    cands = {1: [Fp4Config(1, 64, 512, 0, 4, 2, 4), Fp4Config(1, 128, 256, 0, 4, 2, 4)],
             2: swapped + [Fp4Config(16, 64, 128, 0, 4, 4, 8)],
             16: swapped + [Fp4Config(16, 128, 128, 0, 8, 3, 4)]}
    for kind in ("nvfp4", "mxfp4"):
        block = 16 if kind == "nvfp4" else 32
        w = (_expert_weight("mxfp4", n, k) if kind == "mxfp4" else
             MicroWeight(torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8),
                         (torch.rand(n, k // 16, device="cuda") * 400 + 1).to(torch.float8_e4m3fn).float(), 16,
                         torch.tensor(1e-4, device="cuda")))
        kern = TritonFp4Kernel.prepare(LinearSpec(w, WEIGHT_ONLY, torch.bfloat16), PLATFORM)
        nbytes = n * k // 2 + n * k // block
        for m, cfgs in cands.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w.dequantize().t()
            for cfg in cfgs:
                try:
                    y = fp4_matmul(x, kern.packed, kern.scale, block, kern.scale_kind, kern.post, cfg)
                    err = float((y.float() - ref).norm() / ref.norm())
                    us = _us(lambda cfg=cfg, x=x, kn=kern, b=block: fp4_matmul(x, kn.packed, kn.scale, b,
                                                                               kn.scale_kind, kn.post, cfg))
                    print(f"| {kind} | m={m} | {cfg} | {us:.1f}us | {100 * nbytes / (us * 1e-6) / COPY_CEILING:.0f}% "
                          f"| err {err:.1e} |", flush=True)
                except Exception as ex:  # noqa: BLE001
                    print(f"| {kind} | m={m} | {cfg} | failed: {type(ex).__name__}: {ex} |", flush=True)
