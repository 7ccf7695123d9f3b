"""CPU decode ops of the native extension (platforms/xpu/csrc/decode_ops.cpp via cpu_layer_ops and
cpu_decode_stack): each op against the torch path it replaces and a float64 reference, then engines with the
native ops vs the torch ops (tiny Llama/Qwen2 quantized online to int4, the real SmolLM2 GGUF)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from quantrt.engine.forward_batch import ForwardBatch
from quantrt.engine.kv_pool import KVPool
from quantrt.engine.kv_quant import KVCacheSpec, KVKind, fp4_dequantize
from quantrt.layers.attention import PagedAttention
from quantrt.layers.rotary import RotaryEmbedding
from quantrt.platforms.xpu import cpu_layer_ops as ops
from quantrt.platforms.xpu.cpu_platform import CpuPlatform, _cpu_rms_norm

pytestmark = pytest.mark.skipif(not ops.available(), reason=f"native CPU ops: {ops.unavailable_reason()}")

SPECS = {
    "fp32": KVCacheSpec("auto", KVKind.PLAIN, torch.float32),
    "bf16": KVCacheSpec("bf16", KVKind.PLAIN, torch.bfloat16),
    "fp16": KVCacheSpec("auto", KVKind.PLAIN, torch.float16),
    "fp8_e4m3": KVCacheSpec("fp8_e4m3", KVKind.FP8, torch.float8_e4m3fn),
    "fp8_e5m2": KVCacheSpec("fp8_e5m2", KVKind.FP8, torch.float8_e5m2),
    "fp4_e2m1": KVCacheSpec("fp4_e2m1", KVKind.FP4, None),
}


class TorchOpsCpu(CpuPlatform):
    """The CPU platform with every native layer op off: the torch path the ops replace (linears unchanged)."""

    decode_attention_ref = None

    def _native_layer_ops(self):
        return None


# -- RMSNorm, add + RMSNorm, act * mul -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_ops_match_torch_path_and_float64(dtype) -> None:
    torch.manual_seed(0)
    d = 100                                                          # not a multiple of the SIMD width
    x = (torch.randn(3, 2 * d) * 3).to(dtype)[:, ::2]                # strided rows
    delta = torch.randn(3, d).to(dtype)
    w = torch.randn(d).to(dtype)
    y = torch.ops.quantrt_cpu.rms_norm(x, w, 1e-6)                  # the C++ ops (the stack runs them in fp32 too)
    y2, s = torch.ops.quantrt_cpu.add_rms_norm(x, delta, w, 1e-6)
    ref_s = x + delta                                                # the residual add, rounded like torch's
    assert torch.equal(s, ref_s)
    w_y2, w_s = ops.cpu_add_rms_norm(x, delta, w, 1e-6)              # the hooks: native in bf16/fp16, torch in fp32
    assert torch.equal(w_s, ref_s) and torch.equal(w_y2, _cpu_rms_norm(ref_s, w, 1e-6) if dtype == torch.float32
                                                   else y2)
    assert torch.equal(ops.cpu_rms_norm(x, w, 1e-6), _cpu_rms_norm(x, w, 1e-6) if dtype == torch.float32 else y)
    for got, inp in ((y, x), (y2, ref_s)):
        torch_path = _cpu_rms_norm(inp, w, 1e-6)
        if dtype == torch.float32:                                   # summation order only
            torch.testing.assert_close(got, torch_path, rtol=1e-6, atol=1e-6)
        else:                                                        # same roundings at the same points
            assert torch.equal(got, torch_path)
        x64 = inp.double()
        ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
        assert torch.allclose(got.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_mul_matches_torch(dtype, gelu) -> None:
    torch.manual_seed(1)
    n = 37
    gu = (torch.randn(4, 2 * n) * 4).to(dtype)
    gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])            # exp under/overflow at the ends
    g, u = gu[:, :n], gu[:, n:]
    act = F.gelu(g, approximate="tanh") if gelu else F.silu(g)
    ref = act * u
    got = ops.cpu_act_mul(gu, gelu)
    assert got.shape == (4, n) and got.dtype == dtype
    if dtype == torch.float32:                                       # exp/tanh to a few ulps
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-6)
    else:                                                            # at most one bf16 rounding step apart
        torch.testing.assert_close(got, ref, rtol=8e-3, atol=1e-6)
    g64, u64 = g.double(), u.double()
    a64 = F.gelu(g64, approximate="tanh") if gelu else F.silu(g64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.double(), (a64.to(dtype).double() * u64), rtol=tol, atol=tol)


# -- rotary + KV write ---------------------------------------------------------------------------------------
def _rope(dtype: torch.dtype, d: int = 16) -> RotaryEmbedding:
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    return RotaryEmbedding(cfg, d, 64).to(dtype, torch.device("cpu"))


@pytest.mark.parametrize("dtype,kv", [(torch.float32, "fp32"), (torch.float32, "bf16"), (torch.bfloat16, "bf16"),
                                      (torch.bfloat16, "fp8_e4m3"), (torch.float32, "fp8_e5m2")])
def test_rope_store_kv_matches_rotary_and_pool_write(dtype, kv) -> None:
    torch.manual_seed(2)
    t, h, hkv, d = 3, 6, 2, 16
    qkv = (torch.randn(t, (h + 2 * hkv) * d) * 2).to(dtype)          # the fused projection's output
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(t, h, d), k.view(t, hkv, d), v.view(t, hkv, d)
    rope = _rope(dtype)
    pos, slots = torch.tensor([0, 9, 41]), torch.tensor([5, 0, 11])
    mine, ref = (KVPool(1, 16, hkv, d, SPECS[kv], torch.device("cpu")) for _ in range(2))
    ks, vs = (0.5, 2.0) if kv.startswith("fp8") else (1.0, 1.0)
    qr = ops.cpu_rotary_kv_store(q, k, v, *rope.half_tables(), pos, mine, 0, slots, ks, vs)
    q_ref, k_ref = rope(rope.tables(pos), q, k)
    ref.write(0, slots, k_ref, v, ks, vs)
    if dtype == torch.float32:
        torch.testing.assert_close(qr, q_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mine.gather(0, slots, ks, vs)[0].float(), ref.gather(0, slots, ks, vs)[0].float(),
                                   rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(qr, q_ref)
        assert torch.equal(mine.k[0], ref.k[0])
    assert torch.equal(mine.v[0], ref.v[0])
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[slots] = False
    assert not mine.k[0][untouched].any() and not mine.v[0][untouched].any()


def test_rope_store_kv_declines_fp4_and_pools_without_v() -> None:
    rope = _rope(torch.float32)
    q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 16)
    for pool in (KVPool(1, 8, 2, 16, SPECS["fp4_e2m1"], torch.device("cpu")),
                 KVPool(1, 8, 2, 16, torch.float32, torch.device("cpu"), has_v=False)):
        before = [t.clone() for t in pool.k]
        assert ops.cpu_rotary_kv_store(q, k, k, *rope.half_tables(), torch.tensor([1]), pool, 0,
                                       torch.tensor([3])) is None
        assert torch.equal(pool.k[0], before[0])                     # nothing written


# -- paged decode attention ------------------------------------------------------------------------------------
def _filled_pool(kv: str, hkv: int, d: int, slots: int, scale: float) -> KVPool:
    pool = KVPool(1, slots, hkv, d, SPECS[kv], torch.device("cpu"))
    data = torch.randn(slots, hkv, d) * 2
    pool.write(0, torch.arange(slots), data, torch.randn(slots, hkv, d), scale, scale)
    return pool


def _stored(pool: KVPool, which: str, scale: float) -> torch.Tensor:
    """Every slot of the pool as float64 values (what attention must read)."""
    buf = getattr(pool, which)[0]
    if pool.spec.kind is KVKind.PLAIN:
        return buf.double()
    if pool.spec.kind is KVKind.FP8:
        return buf.view(pool.spec.dtype).double() * scale
    sc = (pool.k_sc if which == "k" else pool.v_sc)[0]
    return fp4_dequantize(buf, sc).double() * scale


def _attention_ref(q, kk, vv, slots, lens, scale, window, sinks):
    # q [B, H, D]; kk, vv [S, Hkv, D] float64 -> [B, H*D] float64
    b, h, d = q.shape
    g = h // kk.shape[1]
    out = torch.zeros(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        lo = max(0, n - window) if window else 0
        ks, vs = kk[slots[i, lo:n]], vv[slots[i, lo:n]]              # [L, Hkv, D]
        for j in range(h):
            s = ks[:, j // g] @ q[i, j].double() * scale
            if sinks is not None:
                s = torch.cat([s, sinks[j].double().view(1)])
            p = torch.softmax(s, 0)[: n - lo]
            out[i, j] = p @ vs[:, j // g]
    return out.reshape(b, h * d)


@pytest.mark.parametrize("kv,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float32),
                                      ("fp8_e4m3", torch.bfloat16), ("fp8_e5m2", torch.float32),
                                      ("fp4_e2m1", torch.float32), ("fp4_e2m1", torch.bfloat16)])
@pytest.mark.parametrize("window,sinks", [(None, False), (5, False), (None, True)])
def test_decode_attention_matches_float64(kv, dtype, window, sinks) -> None:
    torch.manual_seed(3)
    b, h, hkv, d, nslots = 3, 6, 2, 32, 64
    kscale = 0.75 if kv.startswith(("fp8", "fp4")) else 1.0
    pool = _filled_pool(kv, hkv, d, nslots, kscale)
    lens = torch.tensor([1, 7, 33])                                  # odd lengths, one single-token sequence
    slots = torch.stack([torch.randperm(nslots)[:33] for _ in range(b)])
    q = torch.randn(b, h, d).to(dtype)
    sink = torch.randn(h) if sinks else None
    layer = PagedAttention(0, h, hkv, d, d ** -0.5, window)
    layer.k_scale = layer.v_scale = kscale
    fb = ForwardBatch(input_ids=torch.zeros(b, dtype=torch.long), positions=lens - 1, out_slots=slots[:, 0],
                      q_lens=[1] * b, kv_lens=lens.tolist(), seq_slots=[], logits_rows=torch.arange(b),
                      kv_pool=pool, is_decode=True, kv_slots=slots, kv_lens_t=lens)
    got = ops.cpu_decode_attention(layer, q, fb, sink)
    assert got.shape == (b, h * d) and got.dtype == dtype
    ref = _attention_ref(q, _stored(pool, "k", kscale), _stored(pool, "v", kscale), slots, lens, d ** -0.5, window,
                         sink)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.double(), ref, rtol=tol, atol=tol), (got.double() - ref).abs().max()
    # and the torch path it replaces (PagedAttention's SDPA over the gathered pages) on the same batch
    layer.finish_loading(TorchOpsCpu())
    sdpa = layer.attend(q, fb, sink)
    torch.testing.assert_close(got.float(), sdpa.float(), rtol=tol, atol=tol)


def test_decode_attention_declines_mla_pools() -> None:
    pool = KVPool(1, 8, 1, 16, torch.float32, torch.device("cpu"), has_v=False)
    fb = ForwardBatch(input_ids=torch.zeros(1, dtype=torch.long), positions=torch.tensor([0]),
                      out_slots=torch.tensor([0]), q_lens=[1], kv_lens=[1], seq_slots=[], logits_rows=torch.arange(1),
                      kv_pool=pool, is_decode=True, kv_slots=torch.zeros(1, 1, dtype=torch.long),
                      kv_lens_t=torch.tensor([1]))
    assert ops.cpu_decode_attention(PagedAttention(0, 2, 1, 16, 0.25), torch.randn(1, 2, 16), fb, None) is None


def test_native_ops_reject_bad_inputs_with_clear_errors() -> None:
    k = torch.zeros(8, 2, 16)
    q = torch.randn(1, 4, 16)
    slots, lens = torch.zeros(1, 4, dtype=torch.long), torch.tensor([5])
    att = torch.ops.quantrt_cpu.decode_attention
    with pytest.raises(RuntimeError, match=r"kv_lens\[0\] = 5 is outside \[1, 4\]"):
        att(q, k, k, None, None, slots, lens, 0.25, 0, 0, 1.0, 1.0, None)
    with pytest.raises(RuntimeError, match="slot 9 outside the cache of 8 slots"):
        att(q, k, k, None, None, torch.full((1, 4), 9), torch.tensor([2]), 0.25, 0, 0, 1.0, 1.0, None)
    with pytest.raises(RuntimeError, match="kind 7 is not 0 .plain., 1 .fp8 e4m3fn., 2 .fp8 e5m2. or 3 .fp4 e2m1."):
        att(q, k, k, None, None, slots, torch.tensor([2]), 0.25, 0, 7, 1.0, 1.0, None)
    with pytest.raises(RuntimeError, match="3 query heads are not a multiple of 2 KV heads"):
        att(torch.randn(1, 3, 16), k, k, None, None, slots, torch.tensor([2]), 0.25, 0, 0, 1.0, 1.0, None)
    rope = _rope(torch.float32)
    store = torch.ops.quantrt_cpu.rope_store_kv
    cos, sin = rope.half_tables()
    with pytest.raises(RuntimeError, match="position 64 outside the rotary table of 64"):
        store(q, k[:1], k[:1], cos, sin, torch.tensor([64]), k, k.clone(), torch.tensor([0]), 0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="slot 8 outside the cache of 8 slots"):
        store(q, k[:1], k[:1], cos, sin, torch.tensor([1]), k, k.clone(), torch.tensor([8]), 0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="weight dtype BFloat16 differs from x's Float"):
        torch.ops.quantrt_cpu.rms_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match=r"needs the merged gate_up output \[T, 2I\]"):
        ops.cpu_act_mul(torch.randn(2, 7))


def test_quantrt_env_names_the_layer_ops() -> None:
    assert CpuPlatform(use_psutil=False).describe()["layer_ops"].startswith("native (csrc/decode_ops.cpp")
    assert TorchOpsCpu(use_psutil=False).rms_norm_op() is _cpu_rms_norm


def test_without_the_extension_the_hooks_fall_back_to_torch_with_the_reason() -> None:
    import os
    import subprocess
    import sys

    code = ("from quantrt.platforms.xpu.cpu_platform import CpuPlatform, _cpu_rms_norm\n"
            "p = CpuPlatform(use_psutil=False)\n"
            "print(p.describe()['layer_ops'])\n"
            "print(p.rms_norm_op() is _cpu_rms_norm, p.fused_add_rms_norm_op(), p.rotary_kv_store_op(), "
            "p.act_mul_op(), p.decode_stack_op(None))\n"
            "from quantrt.platforms.xpu.cpu_layer_ops import cpu_decode_attention\n"
            "print(cpu_decode_attention(None, None, type('FB', (), {'kv_pool': None, 'kv_slots': None})(), None))\n")
    env = dict(os.environ, QUANTRT_DISABLE_CPU_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "torch (native ops unavailable: disabled by QUANTRT_DISABLE_CPU_EXT=1)"
    assert lines[1] == "True None None None None" and lines[2] == "None"


# -- engines: native ops (one stack call per decode step) vs the torch ops ---------------------------------------
def _generate(engine, ids: list[list[int]], n: int) -> list[tuple[list[int], list[float]]]:
    sp = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
    outs = engine.generate(input_ids=ids, sampling_params=sp, return_logprob=True)
    return [(o["output_ids"], [t[0] for t in o["meta_info"]["output_token_logprobs"]]) for o in outs]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer_dir):
    from tests.helpers_models import build_model

    out = {}
    for arch in ("llama", "qwen2"):                                  # qwen2: qkv bias, tied head
        d = tmp_path_factory.mktemp(f"decode_ops_{arch}")
        build_model(arch, d, tokenizer_dir)
        out[arch] = str(d)
    return out


@pytest.mark.parametrize("arch,dtype,kv", [("llama", "float32", "auto"), ("llama", "bfloat16", "auto"),
                                           ("llama", "float32", "fp8_e4m3"), ("qwen2", "bfloat16", "fp8_e5m2")])
def test_engine_native_stack_matches_torch_ops(tiny_dir, arch, dtype, kv) -> None:
    from quantrt import Engine

    kw = dict(model_path=tiny_dir[arch], max_total_tokens=512, dtype=dtype, kv_cache_dtype=kv,
              torchao_config="int4wo-32", random_seed=0)
    ids = [[5, 17, 33, 9, 81, 4, 60], [7, 7, 19]]                    # batch 2, different lengths
    native = Engine(**kw)
    stack = native.model.model.decode_stack
    calls = []
    orig = stack.__call__

    class Counting:                                                   # the stack must serve the decode steps
        def __call__(self, x, fb):
            h = orig(x, fb)
            calls.append(h is not None)
            return h

    native.model.model.decode_stack = Counting()
    got = _generate(native, ids, 12)
    assert stack.reason is None and calls and all(calls), stack.reason
    native.model.model.decode_stack = None                            # native ops, layer by layer
    layerwise = _generate(native, ids, 12)
    ref = _generate(Engine(platform=TorchOpsCpu(), **kw), ids, 12)
    tol = 2e-4 if dtype == "float32" else 5e-2
    for (t1, l1), (t2, l2), (t3, l3) in zip(got, layerwise, ref):
        assert t1 == t2 and t1 == t3
        if dtype == "bfloat16":                                       # the stack is the layer path, bit for bit
            assert l1 == l2
        else:                                                         # fp32 layers keep torch's RMSNorm kernel
            assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5
        assert max(abs(a - b) for a, b in zip(l1, l3)) < tol


def test_decode_stack_declines_dense_linears_with_the_reason(tiny_dir) -> None:
    from quantrt import Engine

    eng = Engine(model_path=tiny_dir["llama"], max_total_tokens=256, dtype="float32")
    out = _generate(eng, [[5, 17, 33]], 4)
    stack = eng.model.model.decode_stack
    assert stack.reason is not None and "not one cpu_native_int kernel" in stack.reason
    ref = _generate(Engine(platform=TorchOpsCpu(), model_path=tiny_dir["llama"], max_total_tokens=256,
                           dtype="float32"), [[5, 17, 33]], 4)
    assert out[0][0] == ref[0][0]


def _to_torch_ops(engine) -> None:
    """Re-point a loaded model's layers at TorchOpsCpu's hooks, as CausalLM.finish_loading does (the GGUF takes
    tens of seconds to load on a busy 2-core box, so the reference reuses the loaded linears)."""
    from quantrt.layers.norm import RMSNorm
    from quantrt.models.decoder import Mlp

    plat, model = TorchOpsCpu(), engine.model
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.finish_loading(engine.dtype, plat)
        elif isinstance(m, (PagedAttention, Mlp)):
            m.finish_loading(plat)
    for r in model.model.rotaries:
        r.to(engine.dtype, torch.device("cpu"), plat)
    model.model.decode_stack = plat.decode_stack_op(model.model)
    assert model.model.decode_stack is None


def test_smollm2_gguf_native_stack_matches_torch_ops() -> None:
    from quantrt import Engine
    from quantrt.demo_model import default_model_path

    ids = [[1, 504, 2365, 6354, 16438, 27003, 690, 260]]
    engine = Engine(model_path=default_model_path(), max_total_tokens=1024, random_seed=0)   # fp32 compute
    got = _generate(engine, ids, 16)
    assert engine.model.model.decode_stack.reason is None
    _to_torch_ops(engine)
    ref = _generate(engine, ids, 16)
    assert got[0][0] == ref[0][0]
    assert max(abs(a - b) for a, b in zip(got[0][1], ref[0][1])) < 1e-3
