"""ROCm paged decode attention through aiter's paged_attention_rocm on the CPU emulation (EMULATED: no MI300
here): the x-packed cache layout, the op against float64 (bf16 and fp8 e4m3fnuz pages with k/v scales, several
256-key partitions), the hook against PagedAttention's SDPA path, its declines, and end to end (a tiny llama with
head_dim 64 on the emulated MI300 gives the CPU platform's greedy tokens, bf16 and fp8 KV)."""

from __future__ import annotations

import pytest
import torch

from quantrt.engine.engine import Engine
from quantrt.engine.forward_batch import ForwardBatch
from quantrt.engine.kv_pool import KVPool
from quantrt.engine.kv_quant import resolve_kv_cache_dtype
from quantrt.layers.attention import PagedAttention, platform_decode_attention
from quantrt.platforms.rocm.aiter_attention import aiter_decode_attention, to_aiter_kv_cache
from quantrt.platforms.rocm.emulation import EmulatedAiterOps, EmulatedRocmPlatform
from quantrt.platforms.rocm.platform import RocmPlatform
from quantrt.platforms.xpu.cpu_platform import CpuPlatform

MI300 = EmulatedRocmPlatform()
OPS = EmulatedAiterOps()
F64 = torch.float64
FNUZ = torch.float8_e4m3fnuz


def test_x_packed_key_layout():
    nslots, hkv, d, bs = 64, 2, 64, 16
    k = torch.randn(nslots, hkv, d).to(torch.bfloat16)
    v = torch.randn(nslots, hkv, d).to(torch.bfloat16)
    kc, vc = to_aiter_kv_cache(k, v, bs)
    x = 8                                                                           # 16 bytes / 2-byte elements
    assert kc.shape == (4, hkv, d // x, bs, x) and vc.shape == (4, hkv, d, bs)
    for blk, h, dd, j in [(0, 0, 0, 0), (1, 1, 13, 5), (3, 0, 63, 15), (2, 1, 40, 9)]:
        assert kc[blk, h, dd // x, j, dd % x] == k[blk * bs + j, h, dd]
        assert vc[blk, h, dd, j] == v[blk * bs + j, h, dd]
    k8 = k.float().to(FNUZ).view(torch.uint8)
    assert to_aiter_kv_cache(k8, k8, bs)[0].shape == (4, hkv, d // 16, bs, 16)       # fp8: x = 16


def _rows_f64(cache_rows: torch.Tensor, fp8: bool, scale: float) -> torch.Tensor:
    return (cache_rows.view(FNUZ).to(F64) * scale) if fp8 else cache_rows.to(F64)


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_paged_attention_rocm_matches_float64(kv):
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, d, bs, nb = 3, 8, 2, 64, 16, 48
    fp8 = kv == "fp8"
    k_rows = torch.randn(nb * bs, hkv, d, generator=gen)
    v_rows = torch.randn(nb * bs, hkv, d, generator=gen)
    ks, vs = (0.5, 0.25) if fp8 else (1.0, 1.0)
    if fp8:
        k_rows, v_rows = ((r / s).to(FNUZ).view(torch.uint8) for r, s in ((k_rows, ks), (v_rows, vs)))
    else:
        k_rows, v_rows = k_rows.to(torch.bfloat16), v_rows.to(torch.bfloat16)
    kc, vc = to_aiter_kv_cache(k_rows, v_rows, bs)
    lens = [600, 17, 300]                                                          # 3, 1 and 2 partitions
    perm = torch.randperm(nb, generator=gen).to(torch.int32)
    table = torch.zeros(b, 38, dtype=torch.int32)
    table[0] = perm[:38]
    table[1, :2] = perm[38:40]
    table[2, :19] = perm[20:39]
    q = torch.randn(b, h, d, generator=gen).to(torch.bfloat16)
    parts = 3
    out = torch.empty_like(q)
    exp_sums, max_logits = torch.empty(b, h, parts), torch.empty(b, h, parts)
    tmp = torch.empty(b, h, parts, d, dtype=q.dtype)
    OPS.paged_attention_rocm(out, exp_sums, max_logits, tmp, q, kc, vc, hkv, 0.125, table,
                             torch.tensor(lens, dtype=torch.int32), bs, 600, None, kv,
                             torch.tensor([ks]), torch.tensor([vs]), None, 256)
    for i, n in enumerate(lens):
        rows = [int(table[i, j // bs]) * bs + j % bs for j in range(n)]
        kk, vv = _rows_f64(k_rows[rows], fp8, ks), _rows_f64(v_rows[rows], fp8, vs)          # [n, Hkv, D]
        for hh in range(h):
            s = (q[i, hh].to(F64) @ kk[:, hh // 4].T) * 0.125
            want = torch.softmax(s, 0) @ vv[:, hh // 4]
            assert (out[i, hh].to(F64) - want).abs().max() < 2e-2
            first = s[:256]
            assert abs(float(max_logits[i, hh, 0]) - float(first.max())) < 1e-3
            assert abs(float(exp_sums[i, hh, 0]) - float((first - first.max()).exp().sum())) < 1e-3


def test_paged_attention_rocm_rejects_what_the_kernel_does_not_take():
    q = torch.zeros(1, 4, 32, dtype=torch.bfloat16)
    kc = torch.zeros(2, 2, 4, 16, 8, dtype=torch.bfloat16)
    vc = torch.zeros(2, 2, 32, 16, dtype=torch.bfloat16)
    args = (torch.empty_like(q), torch.empty(1, 4, 1), torch.empty(1, 4, 1), torch.empty(1, 4, 1, 32, dtype=q.dtype))
    t, n = torch.zeros(1, 2, dtype=torch.int32), torch.tensor([3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="head_size 32 not in 64, 128"):
        OPS.paged_attention_rocm(*args, q, kc, vc, 2, 0.1, t, n, 16, 3, None, "auto", 1.0, 1.0)
    q64 = torch.zeros(1, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="block_size 8 not in 16, 32"):
        OPS.paged_attention_rocm(*args, q64, kc, vc, 2, 0.1, t, n, 8, 3, None, "auto", 1.0, 1.0)
    with pytest.raises(RuntimeError, match="kv_cache_dtype 'int8' not in auto, fp8, fp8_e4m3"):
        OPS.paged_attention_rocm(*args, q64, kc, vc, 2, 0.1, t, n, 16, 3, None, "int8", 1.0, 1.0)
    with pytest.raises(RuntimeError, match=r"key_cache must be \[num_blocks, 2, 8, 16, 8\]"):
        OPS.paged_attention_rocm(*args, q64, kc, vc, 2, 0.1, t, n, 16, 3, None, "auto", 1.0, 1.0)


def _decode_batch(kv: str, hkv: int, d: int, lens: list[int], gen: torch.Generator):
    dtype = torch.bfloat16
    spec = dtype if kv == "bf16" else resolve_kv_cache_dtype(kv, dtype, MI300)
    pool = KVPool(1, 512, hkv, d, spec, torch.device("cpu"))
    pages = [[7, 2, 11, 30, 5], [4, 9]]
    seq_slots = [(torch.tensor(p)[:, None] * 16 + torch.arange(16)).flatten()[:n] for p, n in zip(pages, lens)]
    for s in seq_slots:
        pool.write(0, s[:-1], torch.randn(len(s) - 1, hkv, d, generator=gen).to(dtype),
                   torch.randn(len(s) - 1, hkv, d, generator=gen).to(dtype), 0.5, 0.5)
    kv_slots = torch.zeros(2, max(lens), dtype=torch.long)
    for i, s in enumerate(seq_slots):
        kv_slots[i, : len(s)] = s
    out_slots = torch.stack([s[-1] for s in seq_slots])
    return pool, ForwardBatch(torch.zeros(2, dtype=torch.long), torch.tensor([n - 1 for n in lens]), out_slots,
                              [1, 1], lens, seq_slots, torch.arange(2), pool, True, kv_slots)


@pytest.mark.parametrize("kv", ["bf16", "fp8_e4m3"])
def test_aiter_decode_hook_equals_paged_attention_sdpa(kv, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    hkv, g, d = 2, 4, 64
    pool, fb = _decode_batch(kv, hkv, d, [70, 20], gen)
    assert pool.spec.dtype in (torch.bfloat16, FNUZ)
    layer = PagedAttention(0, hkv * g, hkv, d, d ** -0.5)
    layer.k_scale = layer.v_scale = 0.5
    q = torch.randn(2, hkv * g, d, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(2, hkv, d, generator=gen).to(torch.bfloat16) for _ in range(2))
    sdpa = layer(q, k, v, fb)                                                    # CPU platform: SDPA
    layer.finish_loading(MI300)
    calls = []
    orig = EmulatedAiterOps.paged_attention_rocm
    monkeypatch.setattr(EmulatedAiterOps, "paged_attention_rocm",
                        lambda self, *a: calls.append((a[14], a[11])) or orig(self, *a))
    fast = layer(q, k, v, fb)                                                    # bound to the MI300: aiter
    assert calls == [("fp8" if kv != "bf16" else "auto", 16)]
    assert fast.shape == sdpa.shape and (fast.float() - sdpa.float()).abs().max() < 2e-2


def test_aiter_decode_hook_declines_and_falls_back():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 8, 64).to(torch.bfloat16)
    _, fb = _decode_batch("bf16", 2, 64, [30, 5], gen)
    for layer, sinks in [(PagedAttention(0, 8, 2, 64, 0.1, sliding_window=8), None),
                         (PagedAttention(0, 8, 2, 64, 0.1), torch.zeros(8))]:
        layer.finish_loading(MI300)
        assert aiter_decode_attention(layer, q, fb, sinks) is None               # window / sinks: SDPA
    _, fb32 = _decode_batch("bf16", 2, 32, [30, 5], gen)
    layer = PagedAttention(0, 8, 2, 32, 0.1)
    layer.finish_loading(MI300)
    assert aiter_decode_attention(layer, torch.randn(2, 8, 32).to(torch.bfloat16), fb32) is None  # head_dim 32
    _, fb4 = _decode_batch("fp4_e2m1", 2, 64, [30, 5], gen)
    layer = PagedAttention(0, 8, 2, 64, 0.1)
    layer.finish_loading(MI300)
    assert aiter_decode_attention(layer, q, fb4) is None                         # fp4 pages


def test_rocm_resolves_the_aiter_hook_and_falls_back_without_the_switch(monkeypatch):
    for var in ("SGLANG_USE_AITER", "QUANTRT_USE_AITER"):
        monkeypatch.delenv(var, raising=False)
    rocm = RocmPlatform(arch="gfx942")
    assert platform_decode_attention(rocm) is aiter_decode_attention
    assert platform_decode_attention(MI300) is aiter_decode_attention
    layer = PagedAttention(0, 8, 2, 64, 0.1)
    layer.finish_loading(rocm)
    _, fb = _decode_batch("bf16", 2, 64, [30, 5], torch.Generator().manual_seed(3))
    assert aiter_decode_attention(layer, torch.zeros(2, 8, 64, dtype=torch.bfloat16), fb) is None  # CPU, aiter off


@pytest.fixture(scope="module")
def llama_d64(tmp_path_factory, tokenizer_dir):
    """A random tiny llama with head_dim 64 (a head size paged_attention_rocm takes), GQA 2:1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                      eos_token_id=2, bos_token_id=0, pad_token_id=0, initializer_range=0.1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = tmp_path_factory.mktemp("llama_d64")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("kv", ["auto", "fp8_e4m3"])
def test_tiny_llama_on_emulated_mi300_decodes_through_aiter(llama_d64, kv, monkeypatch):
    calls = []
    orig = EmulatedAiterOps.paged_attention_rocm
    monkeypatch.setattr(EmulatedAiterOps, "paged_attention_rocm",
                        lambda self, *a: calls.append(1) or orig(self, *a))
    common = {"model_path": str(llama_d64), "dtype": "bfloat16", "max_total_tokens": 1024, "kv_cache_dtype": kv}
    rocm = Engine(platform=MI300, **common)
    prompts = [list(range(5, 30)), list(range(40, 49))]
    p = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    got = [o["output_ids"] for o in rocm.generate(input_ids=prompts, sampling_params=p)]
    assert len(calls) >= 11 * 2
    if kv == "auto":
        ref = Engine(platform=CpuPlatform(), **common)
        assert got == [o["output_ids"] for o in ref.generate(input_ids=prompts, sampling_params=p)]
    else:  # e4m3fnuz pages on the MI300 vs e4m3fn on CPU: compare with the SDPA path on the same MI300 pool
        monkeypatch.setattr(EmulatedRocmPlatform, "decode_attention_ref", None)
        import quantrt.layers.attention as attn

        attn._DECODE_BACKENDS.pop(EmulatedRocmPlatform, None)
        sdpa = Engine(platform=EmulatedRocmPlatform(), **common)
        assert got == [o["output_ids"] for o in sdpa.generate(input_ids=prompts, sampling_params=p)]
        attn._DECODE_BACKENDS.pop(EmulatedRocmPlatform, None)
