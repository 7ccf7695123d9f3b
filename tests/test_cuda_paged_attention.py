"""Triton paged decode attention (bf16/fp8/fp4 pages, GQA, window, sinks, split-KV) vs float64 and the SDPA
path, its PagedAttention hook, and an engine decoding with the Triton attention and MoE kernels.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, tiny shapes, CI);
on the GPU machine `-m accelerator` adds real shapes run natively.
"""

from __future__ import annotations

import pytest
import torch

from quantrt.platforms.cuda.platform import CudaPlatform
from tests._cuda_env import DEV, NEEDS_TRITON, PLATFORM

pytestmark = NEEDS_TRITON


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return float((y.double() - ref.double()).norm() / ref.double().norm())


# -- paged decode attention ----------------------------------------------------------------------------
KV_CASES = ["bf16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"]


def make_kv_pool(kv: str, hkv: int, d: int, num_slots: int):
    from quantrt.engine.kv_pool import KVPool
    from quantrt.engine.kv_quant import resolve_kv_cache_dtype
    from quantrt.platform.interface import Platform

    class _Fp8Platform(Platform):
        def supported_dtypes(self):
            return (torch.float32, torch.bfloat16, torch.float16)

    spec = resolve_kv_cache_dtype(kv, torch.bfloat16, _Fp8Platform())
    return KVPool(1, num_slots, hkv, d, spec, torch.device(DEV))


def attention_float64(q, pool, slots_per_seq, scale, window, k_scale, v_scale, sinks):
    """Independent float64 decode attention over the dequantized pool (GQA head h reads KV head h // G)."""
    b, h, d = q.shape
    hkv = pool.k[0].shape[1]
    out = torch.zeros(b, h, d, dtype=torch.float64)
    for i, slots in enumerate(slots_per_seq):
        k, v = pool.gather(0, slots, k_scale, v_scale)                          # [L, Hkv, D]
        k, v = k.double().cpu(), v.double().cpu()
        n = len(slots)
        keep = torch.arange(n) > n - 1 - window if window else torch.ones(n, dtype=torch.bool)
        for hh in range(h):
            kvh = hh // (h // hkv)
            s = (k[keep, kvh] @ q[i, hh].double().cpu()) * scale                 # [L']
            if sinks is not None:
                s = torch.cat([s, sinks[hh].double().cpu().reshape(1)])
            p = torch.softmax(s, 0)[: int(keep.sum())]
            out[i, hh] = p @ v[keep, kvh]
    return out


@pytest.mark.parametrize("kv", KV_CASES)
@pytest.mark.parametrize("window,sink,splits", [(None, False, 3), (20, True, 0)])
def test_paged_decode_attention(kv, window, sink, splits):
    from quantrt.platforms.cuda.kernels.paged_attention_triton import kv_format, paged_decode_attention

    gen = torch.Generator().manual_seed(len(kv) + (window or 0))
    b, h, hkv, d, num_slots = 3, 4, 2, 32, 256
    pool = make_kv_pool(kv, hkv, d, num_slots)
    lens = [5, 37, 70]
    perm = torch.randperm(num_slots, generator=gen)
    seqs = [perm[sum(lens[:i]):sum(lens[:i]) + n].to(DEV) for i, n in enumerate(lens)]
    k_scale, v_scale = (1.0, 1.0) if kv == "bf16" else (0.5, 2.0)
    for s in seqs:
        pool.write(0, s, torch.randn(len(s), hkv, d, generator=gen).to(DEV) * 2,
                   torch.randn(len(s), hkv, d, generator=gen).to(DEV), k_scale, v_scale)
    kv_slots = torch.zeros(b, max(lens), dtype=torch.int64, device=DEV)
    for i, s in enumerate(seqs):
        kv_slots[i, : len(s)] = s
    q = torch.randn(b, h, d, generator=gen).to(DEV, torch.bfloat16)
    sinks = torch.randn(h, generator=gen).to(DEV) if sink else None
    fmt, why = kv_format(pool)
    assert fmt >= 0, why
    k_sc = pool.k_sc[0] if pool.k_sc else None
    v_sc = pool.v_sc[0] if pool.v_sc else None
    out = paged_decode_attention(q, pool.k[0], pool.v[0], kv_slots, torch.tensor(lens, device=DEV), d ** -0.5,
                                 fmt, window, k_scale, v_scale, k_sc, v_sc, sinks, splits=splits, block_l=16)
    ref = attention_float64(q, pool, seqs, d ** -0.5, window, k_scale, v_scale, sinks)
    assert out.shape == (b, h, d) and out.dtype == torch.bfloat16
    assert rel_err(out.cpu(), ref) < 1e-2


@pytest.mark.parametrize("kv", ["bf16", "fp4_e2m1"])
def test_decode_backend_matches_paged_attention_sdpa(kv):
    """The hook's callable on a real ForwardBatch equals PagedAttention's SDPA decode path (GQA, window)."""
    from quantrt.engine.forward_batch import ForwardBatch
    from quantrt.layers.attention import PagedAttention
    from quantrt.platforms.cuda.kernels.decode_attention_op import decode_attention

    gen = torch.Generator().manual_seed(5)
    hkv, g, d = 2, 3, 16
    pool = make_kv_pool(kv, hkv, d, 128)
    layer = PagedAttention(0, hkv * g, hkv, d, d ** -0.5, sliding_window=20)
    lens = [9, 33]
    seq_slots = [torch.arange(0, 9, device=DEV), torch.arange(40, 73, device=DEV)]
    for s in seq_slots:  # cached prefix
        pool.write(0, s[:-1], torch.randn(len(s) - 1, hkv, d, generator=gen).to(DEV),
                   torch.randn(len(s) - 1, hkv, d, generator=gen).to(DEV))
    kv_slots = torch.zeros(2, 33, dtype=torch.int64, device=DEV)
    for i, s in enumerate(seq_slots):
        kv_slots[i, : len(s)] = s
    out_slots = torch.stack([s[-1] for s in seq_slots])
    fb = ForwardBatch(torch.zeros(2, dtype=torch.long), torch.tensor([8, 32]), out_slots, [1, 1], lens,
                      seq_slots, torch.arange(2), pool, True, kv_slots)
    q = torch.randn(2, hkv * g, d, generator=gen).to(DEV, torch.bfloat16)
    k, v = (torch.randn(2, hkv, d, generator=gen).to(DEV, torch.bfloat16) for _ in range(2))
    sdpa = layer(q, k, v, fb)                                                    # writes k, v; [B, H*D]
    fast = decode_attention(layer, q, fb)
    assert fast is not None and fast.shape == sdpa.shape
    assert rel_err(fast.cpu(), sdpa.cpu()) < 1e-2


def test_key_splits_follow_the_slot_table(monkeypatch):
    """A table of up to 4 key blocks is one split (one launch: the early path); longer ones split into chunks of 2+
    blocks, up to about two programs an SM (H100: 132 SMs; int4 at 400 / 2000 tokens 2.19 / 2.27 ms a step against
    2.37 / 2.35 with 4-block chunks); QUANTRT_CUDA_ATTN_CHUNK_BLOCKS overrides the chunk for A/B runs."""
    from quantrt.platforms.cuda.kernels import paged_attention_triton as P

    monkeypatch.setattr(P, "num_sms", lambda *a: 132)
    monkeypatch.delenv("QUANTRT_CUDA_ATTN_CHUNK_BLOCKS", raising=False)
    splits = lambda b, n: P.default_splits(b, 8, n, 64)  # noqa: E731
    assert [splits(1, n) for n in (64, 256, 257, 512, 2048, 4096)] == [1, 1, 3, 4, 16, 32]
    assert splits(2, 2048) == 16 and splits(2, 4096) == 17 and splits(16, 4096) == 3 and splits(64, 4096) == 1
    monkeypatch.setenv("QUANTRT_CUDA_ATTN_CHUNK_BLOCKS", "4")
    assert splits(1, 2048) == 8 and splits(1, 256) == 1


def test_decode_backend_resolution(monkeypatch):
    """CUDA resolves the Triton decode attention through Platform.decode_attention_ref; CPU resolves none."""
    import quantrt.layers.attention as attn
    from quantrt.platform.interface import Platform
    from quantrt.platforms.cuda.kernels.decode_attention_op import decode_attention

    assert attn.platform_decode_attention(PLATFORM) is decode_attention
    assert attn.platform_decode_attention(Platform()) is None


@pytest.mark.accelerator
@pytest.mark.parametrize("kv", KV_CASES)
@pytest.mark.parametrize("ctx", [4096, 32768])
def test_paged_decode_attention_native(kv, ctx):
    """Llama-3.1-8B attention (32 q / 8 kv heads, d 128) at 4k and 32k context, batch 4, vs float64."""
    from quantrt.platforms.cuda.kernels.paged_attention_triton import kv_format, paged_decode_attention

    gen = torch.Generator().manual_seed(ctx)
    b, h, hkv, d = 2, 32, 8, 128
    pool = make_kv_pool(kv, hkv, d, b * ctx)
    perm = torch.randperm(b * ctx, generator=gen).to(DEV)
    seqs = [perm[i * ctx:(i + 1) * ctx - 17 * i] for i in range(b)]
    for s in seqs:
        pool.write(0, s, torch.randn(len(s), hkv, d, device=DEV), torch.randn(len(s), hkv, d, device=DEV))
    kv_slots = torch.zeros(b, ctx, dtype=torch.int64, device=DEV)
    for i, s in enumerate(seqs):
        kv_slots[i, : len(s)] = s
    q = torch.randn(b, h, d, generator=gen).to(DEV, torch.bfloat16)
    fmt, _ = kv_format(pool)
    out = paged_decode_attention(q, pool.k[0], pool.v[0], kv_slots, torch.tensor([len(s) for s in seqs], device=DEV),
                                 d ** -0.5, fmt, None, 1.0, 1.0, pool.k_sc[0] if pool.k_sc else None,
                                 pool.v_sc[0] if pool.v_sc else None)
    ref = attention_float64(q, pool, seqs, d ** -0.5, None, 1.0, 1.0, None)
    assert rel_err(out.cpu(), ref) < 1e-2


@pytest.mark.accelerator
@pytest.mark.parametrize("kv", KV_CASES)
@pytest.mark.parametrize("window,sink", [(None, False), (24, True)])
def test_paged_attention_hook_native(kv, window, sink, monkeypatch):
    """On CUDA tensors PagedAttention's decode runs the platform kernel and equals its SDPA path."""
    import quantrt.layers.attention as attn
    import quantrt.platforms.cuda.kernels.decode_attention_op as op
    from quantrt.engine.forward_batch import ForwardBatch

    gen = torch.Generator().manual_seed(11)
    hkv, g, d, b, n = 4, 4, 64, 3, 300
    pool = make_kv_pool(kv, hkv, d, b * n + 8)
    layer = attn.PagedAttention(0, hkv * g, hkv, d, d ** -0.5, sliding_window=window)
    lens = [n, n // 2, 7]
    seq_slots = [torch.arange(i * n, i * n + m, device=DEV) for i, m in enumerate(lens)]
    for s in seq_slots:
        pool.write(0, s[:-1], torch.randn(len(s) - 1, hkv, d, generator=gen).to(DEV),
                   torch.randn(len(s) - 1, hkv, d, generator=gen).to(DEV))
    kv_slots = torch.zeros(b, n, dtype=torch.int64, device=DEV)
    for i, s in enumerate(seq_slots):
        kv_slots[i, : len(s)] = s

    def batch():
        return ForwardBatch(torch.zeros(b, dtype=torch.long, device=DEV), torch.tensor(lens, device=DEV) - 1,
                            torch.stack([s[-1] for s in seq_slots]), [1] * b, lens, seq_slots,
                            torch.arange(b, device=DEV), pool, True, kv_slots,
                            kv_lens_t=torch.tensor(lens, device=DEV))

    q = torch.randn(b, hkv * g, d, generator=gen).to(DEV, torch.bfloat16)
    k, v = (torch.randn(b, hkv, d, generator=gen).to(DEV, torch.bfloat16) for _ in range(2))
    sinks = torch.randn(hkv * g, generator=gen).to(DEV) if sink else None
    calls = []
    orig = op.paged_decode_attention   # the name the platform's decode op calls
    monkeypatch.setattr(op, "paged_decode_attention", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    monkeypatch.setattr(attn, "_DECODE_BACKENDS", {})
    fast = layer(q, k, v, batch(), sinks)
    assert calls, "the Triton decode attention was not used"
    monkeypatch.setitem(attn._DECODE_BACKENDS, CudaPlatform, None)
    sdpa = layer(q, k, v, batch(), sinks)
    assert rel_err(fast.float(), sdpa.float()) < 1e-2


def _greedy(engine, prompts):
    """Per prompt: [(token, logprob, gap between the two best logprobs)] of 12 greedy tokens."""
    outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 12, "temperature": 0,
                                                               "ignore_eos": True},
                           return_logprob=True, top_logprobs_num=2)
    return [[(tok, lp, tops[0][0] - tops[1][0])
             for (lp, tok, _), tops in zip(o["meta_info"]["output_token_logprobs"], o["meta_info"]["output_top_logprobs"])]
            for o in outs]


@pytest.mark.accelerator
@pytest.mark.parametrize("arch,kv,swap", [("gemma3", "auto", "attention"), ("gemma3", "fp8_e4m3", "attention"),
                                          ("qwen3_moe", "auto", "attention"), ("qwen3_moe", "auto", "moe")])
def test_engine_decode_with_triton_attention_and_moe_native(tiny_models, arch, kv, swap, monkeypatch):
    """A bf16 engine on the GPU (sliding window + GQA for gemma3, MoE for qwen3_moe) decodes with the Triton
    attention and MoE kernels; a second engine swaps one of them for the portable path (SDPA, or
    grouped_mm MoE) and keeps the other, so the comparison stays deterministic. Tokens and logprobs agree up
    to the first greedy tie-break, and the paths part only where the two best tokens are within 0.25 in
    logprob (bf16 logits near 10 step by 0.0625). (fp4 KV is left to the kernel tests: one flipped e2m1
    code after a bf16 rounding difference upstream moves logprobs by far more than the kernels differ.)"""
    import quantrt.layers.attention as attn
    from quantrt.engine.engine import Engine
    from quantrt.layers.moe.layer import FusedMoE

    prompts = [[5, 17, 99, 3, 42], list(range(10, 60)), [7] * 23]
    kw = dict(model_path=str(tiny_models[arch][0]), dtype="bfloat16", kv_cache_dtype=kv, max_total_tokens=2048,
              page_size=4, random_seed=0)
    monkeypatch.setattr(attn, "_DECODE_BACKENDS", {})
    fast_engine = Engine(**kw)
    moe = [m for m in fast_engine.model.modules() if isinstance(m, FusedMoE)]
    assert (len(moe) > 0) == (arch == "qwen3_moe") and all(m.impl == "triton_moe" for m in moe)
    fast = _greedy(fast_engine, prompts)
    assert attn._DECODE_BACKENDS.get(CudaPlatform) is not None
    del fast_engine
    if swap == "attention":
        monkeypatch.setattr(attn, "_DECODE_BACKENDS", {CudaPlatform: None})
    else:
        monkeypatch.setattr(CudaPlatform, "moe_kernels_ref", None)
    slow_engine = Engine(**kw)
    assert all(m.impl != "triton_moe" for m in slow_engine.model.modules() if isinstance(m, FusedMoE)) == (
        swap == "moe" or arch != "qwen3_moe")
    slow = _greedy(slow_engine, prompts)
    for f, s in zip(fast, slow):
        for (tf, lf, gap), (ts, ls, _) in zip(f, s):
            assert abs(lf - ls) < 5e-2
            if tf != ts:  # greedy may only part at a near tie: top-2 within 4 bf16 ulps of a logit ~10
                assert gap <= 0.25
                break
