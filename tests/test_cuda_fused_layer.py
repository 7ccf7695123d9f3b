"""The fused per-layer decode ops of the CUDA platform (residual add + RMSNorm, rotary + KV-pool write, act * up)
against quantrt's torch reference (the layers' own math) and independent float64 / kv_quant references, their
guards with reasons, and an engine decoding a tiny Llama with and without them.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, tiny shapes, CI); on the GPU
machine `-m accelerator` adds Llama-3.1-8B shapes run natively and an engine on the GPU.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from quantrt.platform.interface import without_fused_layer_ops
from quantrt.platforms.cuda.platform import CudaPlatform
from tests._cuda_env import DEV, NEEDS_TRITON, PLATFORM

pytestmark = NEEDS_TRITON


def _pool(kv: str, hkv: int, d: int, slots: int, dtype: torch.dtype = torch.bfloat16, device: str = DEV):
    from quantrt.engine.kv_pool import KVPool
    from quantrt.engine.kv_quant import resolve_kv_cache_dtype

    return KVPool(1, slots, hkv, d, resolve_kv_cache_dtype(kv, dtype, PLATFORM), torch.device(device))


# -- residual add + RMSNorm ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 64), (1, 96)])
def test_add_rms_norm_equals_the_torch_add_then_norm(dtype, shape) -> None:
    """s = x + delta bit-equal to torch's add; y equal to RMSNorm's torch math on s (to one rounding), and within
    bf16 precision of a float64 norm."""
    from quantrt.layers.norm import RMSNorm
    from quantrt.platforms.cuda.layer_ops import triton_add_rms_norm

    gen = torch.Generator().manual_seed(1)
    x, delta = (torch.randn(*shape, generator=gen).to(DEV, dtype) for _ in range(2))
    norm = RMSNorm(shape[1], 1e-6)
    norm.weight.data = (torch.rand(shape[1], generator=gen) + 0.5).to(DEV)
    norm.finish_loading(dtype)                                      # no platform: the torch math
    y, s = triton_add_rms_norm(x, delta, norm._scale, norm.eps)
    ref_y, ref_s = norm.add_forward(x, delta)
    assert torch.equal(s, ref_s)
    torch.testing.assert_close(y, ref_y, atol=0, rtol=2 ** -7 if dtype != torch.float32 else 1e-6)
    sd = ref_s.double().cpu()
    f64 = sd / sd.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight.double().cpu()
    assert (y.double().cpu() - f64).abs().max() < (2e-2 if dtype != torch.float32 else 1e-5) * f64.abs().max()


def test_add_rms_norm_rejects_mismatched_delta() -> None:
    from quantrt.platforms.cuda.layer_ops import triton_add_rms_norm

    x = torch.randn(2, 32, device=DEV)
    with pytest.raises(ValueError, match=r"delta like x: x \(2, 32\) torch.float32, delta \(2, 16\)"):
        triton_add_rms_norm(x, torch.randn(2, 16, device=DEV), torch.ones(32, device=DEV), 1e-6)


# -- act(gate) * up ------------------------------------------------------------------------------------
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_act_mul_equals_the_torch_mlp_math(gelu, dtype) -> None:
    """silu / gelu-tanh(gate) * up vs the decoder Mlp's torch math and a float64 computation."""
    import torch.nn.functional as F

    from quantrt.platforms.cuda.layer_ops import triton_act_mul

    gen = torch.Generator().manual_seed(2)
    gu = (torch.randn(3, 2 * 1100, generator=gen) * 3).to(DEV, dtype)     # I = 1100: two column blocks, a tail
    out = triton_act_mul(gu, gelu)
    g, u = gu[:, :1100], gu[:, 1100:]
    ref = (F.gelu(g, approximate="tanh") if gelu else F.silu(g)) * u
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    gd, ud = g.double().cpu(), u.double().cpu()
    act = 0.5 * gd * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gd + 0.044715 * gd ** 3))) if gelu else gd * torch.sigmoid(gd)
    assert ((out.double().cpu() - act * ud).abs() <= 2 * tol * (act * ud).abs() + 1e-4).all()


def test_act_mul_rejects_an_odd_width() -> None:
    from quantrt.platforms.cuda.layer_ops import triton_act_mul

    with pytest.raises(ValueError, match=r"merged gate_up output \[T, 2I\], got \(2, 7\)"):
        triton_act_mul(torch.randn(2, 7, device=DEV))


# -- rotary + KV write ---------------------------------------------------------------------------------
def _rope_tables(d: int, positions: int, dtype: torch.dtype):
    """llama3-scaled cos/sin tables from RotaryEmbedding (transformers' rope helper), cast like the model's."""
    from transformers import LlamaConfig

    from quantrt.layers.rotary import RotaryEmbedding

    cfg = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, head_dim=d, rope_theta=500000.0,
                      max_position_embeddings=positions,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    return RotaryEmbedding(cfg, d, positions).to(dtype, torch.device(DEV))


def _rotate_f64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Independent float64 rotation: x [T, H, D], cos/sin [T, D/2] -> [T, H, D]."""
    x, c, s = x.double().cpu(), cos.double().cpu()[:, None], sin.double().cpu()[:, None]
    a, b = (x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]) if neox else (x[..., 0::2], x[..., 1::2])
    ya, yb = a * c - b * s, b * c + a * s
    return torch.cat([ya, yb], -1) if neox else torch.stack([ya, yb], -1).flatten(-2)


def _qkv(t: int, h: int, hkv: int, d: int, dtype: torch.dtype, seed: int):
    """q, k, v as views of one fused qkv output row buffer (what the decoder hands the attention)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(t, (h + 2 * hkv) * d, generator=gen) * 2).to(DEV, dtype)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    return q.view(t, h, d), k.view(t, hkv, d), v.view(t, hkv, d)


KV = ["bf16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"]


@pytest.mark.parametrize("kv", KV)
def test_rotary_kv_store_equals_rotary_then_pool_write(kv) -> None:
    """Neox rotary + pool write in one kernel == RotaryEmbedding's torch rotation then KVPool.write (the
    reference quantizers of kv_quant for fp8/fp4), with per-tensor k/v scales; other slots stay untouched."""
    from quantrt.platforms.cuda.kernels.rope_kv_triton import rotary_kv_store

    t, h, hkv, d, slots = 3, 4, 2, 32, 24
    rope = _rope_tables(d, 200, torch.bfloat16)
    q, k, v = _qkv(t, h, hkv, d, torch.bfloat16, seed=3)
    positions = torch.tensor([0, 77, 199], device=DEV)
    out_slots = torch.tensor([5, 17, 2], device=DEV)
    ks, vs = (0.5, 2.0) if kv != "bf16" else (1.0, 1.0)
    fused, ref = _pool(kv, hkv, d, slots), _pool(kv, hkv, d, slots)
    for p in (fused, ref):  # a recognisable background in every slot
        p.write(0, torch.arange(slots, device=DEV), torch.ones(slots, hkv, d, device=DEV),
                torch.ones(slots, hkv, d, device=DEV))
    q_out = rotary_kv_store(q, k, v, *rope.half_tables(), positions, fused, 0, out_slots, ks, vs)
    q_ref, k_ref = rope(rope.tables(positions), q, k)
    ref.write(0, out_slots, k_ref, v, ks, vs)
    assert q_out.is_contiguous() and q_out.shape == q.shape
    torch.testing.assert_close(q_out, q_ref, atol=0, rtol=2 ** -8)           # at most one bf16 rounding apart
    for a, b in [(fused.k[0], ref.k[0]), (fused.v[0], ref.v[0])] + list(zip(fused.k_sc + fused.v_sc,
                                                                             ref.k_sc + ref.v_sc)):
        same = (a == b).float().mean().item()
        assert same > (0.99 if kv != "bf16" else 0.999), f"{kv}: only {same:.4f} of the stored bytes agree"
    kf, vf = fused.gather(0, out_slots, ks, vs)
    kr, vr = ref.gather(0, out_slots, ks, vs)
    step = {"bf16": 2 ** -7, "fp8_e4m3": 2 ** -3, "fp8_e5m2": 2 ** -2, "fp4_e2m1": 0.5}[kv]
    assert (kf.float() - kr.float()).abs().max() <= step * kr.float().abs().max()
    assert torch.equal(vf, vr)                                               # v is not rotated: bit-exact
    f64 = _rotate_f64(q, rope.cos[positions, : d // 2], rope.sin[positions, : d // 2], True)
    assert (q_out.double().cpu() - f64).abs().max() < 2 ** -6 * f64.abs().max()
    untouched = [s for s in range(slots) if s not in out_slots.tolist()]
    assert torch.equal(fused.k[0][untouched], ref.k[0][untouched])


@pytest.mark.parametrize("neox", [True, False])
def test_rotary_kv_store_rotation_styles_vs_float64(neox) -> None:
    """fp32 q/k: the rotation (neox halves / gptj adjacent pairs) equals a float64 rotation; k lands in the pool."""
    from quantrt.platforms.cuda.kernels.rope_kv_triton import rotary_kv_store

    t, h, hkv, d = 2, 2, 1, 16
    rope = _rope_tables(d, 64, torch.float32)
    q, k, v = _qkv(t, h, hkv, d, torch.float32, seed=4)
    positions, out_slots = torch.tensor([3, 63], device=DEV), torch.tensor([1, 0], device=DEV)
    pool = _pool("auto", hkv, d, 4, torch.float32)
    cos, sin = rope.half_tables()
    q_out = rotary_kv_store(q, k, v, cos, sin, positions, pool, 0, out_slots, neox=neox)
    c, s = cos[positions], sin[positions]
    torch.testing.assert_close(q_out.double().cpu(), _rotate_f64(q, c, s, neox), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool.k[0][out_slots].double().cpu(), _rotate_f64(k, c, s, neox), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool.v[0][out_slots], v)


def test_fp8_encoding_matches_torch_including_subnormals_and_overflow() -> None:
    """The kernel's integer fp8 encoder == torch's conversion: normals, ties, subnormals, zero signs, overflow."""
    from quantrt.platforms.cuda.kernels.rope_kv_triton import rotary_kv_store

    d = 64
    vals = torch.cat([torch.tensor([0.0, -0.0, 2.0 ** -10, -2.0 ** -9 * 1.5, 2.0 ** -17, 464.0, 470.0, 500.0,
                                    1.0625, 1.1875, 57344.0, 61440.0, 70000.0, -3e-5, float("inf"), -1e6]),
                      torch.randn(d - 16) * 30])
    for kv, dt in [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)]:
        pool = _pool(kv, 1, d, 2, torch.float32)
        v = vals.view(1, 1, d).to(DEV)
        q = torch.zeros(1, 1, d, device=DEV)
        rotary_kv_store(q, q.clone(), v, torch.ones(4, d // 2, device=DEV), torch.zeros(4, d // 2, device=DEV),
                        torch.tensor([0], device=DEV), pool, 0, torch.tensor([1], device=DEV))
        want = vals.to(dt).view(torch.uint8)
        got = pool.v[0][1, 0].cpu()
        nan = vals.to(dt).float().isnan()   # torch < 2.13 turns e4m3fn overflow into NaN; 2.13 saturates, as we do
        assert torch.equal(got[~nan], want[~nan]), (kv, (got != want).nonzero().flatten().tolist())
        assert (got[nan].view(dt).float().abs() == 448).all() and kv == "fp8_e4m3" or not nan.any()


def test_rotary_kv_store_guard_reasons() -> None:
    """Every declined case says why, and the op returns None (the layer then runs the torch path)."""
    from quantrt.platforms.cuda.kernels.rope_kv_triton import can_fuse_rotary_kv_store, rotary_kv_store

    q, k, v = _qkv(1, 2, 1, 32, torch.bfloat16, seed=5)
    cos = torch.ones(8, 16, device=DEV, dtype=torch.bfloat16)
    pool = _pool("bf16", 1, 32, 4)
    assert can_fuse_rotary_kv_store(q, k, v, cos, cos, pool, 0) == (True, "")
    q24, k24, v24 = _qkv(1, 2, 1, 24, torch.bfloat16, seed=5)
    cases = [
        ((q24, k24, v24, cos[:, :12], cos[:, :12], _pool("bf16", 1, 24, 4), 0), "head_dim 24 is not a power of two"),
        ((q, k, v, cos[:, :8], cos[:, :8], pool, 0), r"cos table \(8, 8\) is not \[positions, head_dim / 2 = 16\]"),
        ((q, k, v, cos, cos[:4], pool, 0), r"sin table \(4, 16\) does not match the cos table \(8, 16\)"),
        ((q, k.float(), v, cos, cos, pool, 0), "are not one float dtype"),
        ((q, k, v, cos, cos, _pool("bf16", 2, 32, 4), 0), r"rows \(2, 32\) do not match k heads \(1, 32\)"),
        ((q, k, v[:, :, :16], cos, cos, pool, 0), r"are not \[T, H, D\] / \[T, Hkv, D\]"),
    ]
    pool_mla = _pool("bf16", 1, 32, 4)
    pool_mla.has_v = False
    cases.append(((q, k, v, cos, cos, pool_mla, 0), "no V rows"))
    for args, why in cases:
        ok, reason = can_fuse_rotary_kv_store(*args)
        assert not ok and __import__("re").search(why, reason), (why, reason)
        assert rotary_kv_store(*args[:5], torch.zeros(1, dtype=torch.long, device=DEV), *args[5:],
                               torch.zeros(1, dtype=torch.long, device=DEV)) is None


def test_cuda_platform_offers_the_fused_ops() -> None:
    from quantrt.platform.interface import Platform
    from quantrt.platforms.cuda.kernels.rope_kv_triton import rotary_kv_store
    from quantrt.platforms.cuda.layer_ops import triton_act_mul, triton_add_rms_norm

    assert PLATFORM.fused_add_rms_norm_op() is triton_add_rms_norm
    assert PLATFORM.rotary_kv_store_op() is rotary_kv_store
    assert PLATFORM.act_mul_op() is triton_act_mul
    assert PLATFORM.fused_add_rms_norm_codes_op() is triton_add_rms_norm
    assert PLATFORM.act_mul_codes_op() is triton_act_mul
    base = Platform()
    assert base.fused_add_rms_norm_op() is None and base.rotary_kv_store_op() is None and base.act_mul_op() is None
    assert base.fused_add_rms_norm_codes_op() is None and base.act_mul_codes_op() is None


# -- the ops making the next linear's activation codes ----------------------------------------------------------
CODES = [(torch.float8_e4m3fn, None), (torch.int8, None), (torch.float8_e4m3fn, 0.02), (torch.int8, 0.05)]


def _assert_same_codes(got, q: torch.Tensor, sc: torch.Tensor, dtype: torch.dtype, static: float | None) -> None:
    """Bit-equal codes and scales. The interpreter's fp8 cast is not torch's (numpy's conversion), so on the CPU the
    fp8 codes of the static scale (torch's cast) are compared natively only; per token both sides are Triton."""
    assert torch.equal(got.scale, sc)
    if DEV != "cpu" or static is None or dtype == torch.int8:
        assert torch.equal(got.codes.view(torch.int8), q.view(torch.int8))


def _codes_ref(y: torch.Tensor, dtype: torch.dtype, static: float | None):
    """What the linear would make of y itself: `quant_rows` (per token) or the static quantizer."""
    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows
    from quantrt.quant.quantize import qmax, quantize_act_static

    if static is None:
        return quant_rows(y, dtype, qmax(dtype))
    sc = torch.tensor([static], device=y.device)
    return quantize_act_static(y, sc, dtype), sc.reshape(1, 1).expand(y.shape[0], 1)


def _row_codes(dtype: torch.dtype, static: float | None):
    from quantrt.quant.kernel import RowCodes
    from quantrt.quant.quantize import qmax

    return RowCodes(dtype, qmax(dtype), None if static is None else torch.tensor([static], device=DEV))


@pytest.mark.parametrize("dtype,static", CODES, ids=["fp8", "int8", "fp8-static", "int8-static"])
def test_add_rms_norm_codes_equal_the_linears_own(dtype, static) -> None:
    """With `codes`, the norm comes back as the codes and scales the consuming linear would make of its output:
    bit for bit, per token (`quant_rows`) and static (`quantize_act_static`), and the residual is unchanged."""
    from quantrt.platforms.cuda.layer_ops import triton_add_rms_norm
    from quantrt.quant.kernel import QuantizedRows

    gen = torch.Generator().manual_seed(3)
    x, delta = ((torch.randn(5, 96, generator=gen) * 4).to(DEV, torch.bfloat16) for _ in range(2))
    w = (torch.rand(96, generator=gen) + 0.5).to(DEV, torch.bfloat16)
    y, s = triton_add_rms_norm(x, delta, w, 1e-6)
    got, s2 = triton_add_rms_norm(x, delta, w, 1e-6, _row_codes(dtype, static))
    assert isinstance(got, QuantizedRows) and got.shape == (5, 96) and got.codes.dtype == dtype
    q, sc = _codes_ref(y, dtype, static)
    assert torch.equal(s2, s)
    _assert_same_codes(got, q, sc, dtype, static)


@pytest.mark.parametrize("dtype,static", CODES, ids=["fp8", "int8", "fp8-static", "int8-static"])
@pytest.mark.parametrize("gelu", [False, True])
def test_act_mul_codes_equal_the_linears_own(dtype, static, gelu) -> None:
    from quantrt.platforms.cuda.layer_ops import triton_act_mul

    gen = torch.Generator().manual_seed(4)
    gu = (torch.randn(3, 2 * 80, generator=gen) * 3).to(DEV, torch.bfloat16)
    got = triton_act_mul(gu, gelu, _row_codes(dtype, static))
    q, sc = _codes_ref(triton_act_mul(gu, gelu), dtype, static)
    _assert_same_codes(got, q, sc, dtype, static)


def test_codes_ops_return_the_plain_output_for_rows_wider_than_one_pass() -> None:
    """Rows wider than one program holds (16384): the op returns its ordinary output, which the linear quantizes."""
    from quantrt.platforms.cuda.layer_ops import triton_act_mul

    gu = torch.randn(1, 2 * 16400, generator=torch.Generator().manual_seed(0)).to(DEV)
    got = triton_act_mul(gu, False, _row_codes(torch.int8, None))
    assert isinstance(got, torch.Tensor) and torch.equal(got, triton_act_mul(gu, False))


# -- engine parity: a tiny model decoded with and without the fused ops ------------------------------------
def _fused_platform(base: type, counts: dict[str, int]):
    """`base` offering the CUDA platform's fused ops (in the Triton interpreter on CPU), counting their calls."""
    def counted(name: str, fn):
        @functools.wraps(fn)             # keeps what the op says it takes (`fp32_weight`, `takes_pre`)
        def op(*a, **kw):
            out = fn(*a, **kw)
            counts[name] = counts.get(name, 0) + (out is not None)   # rotary_kv_store returns None when it declines
            counts["pre"] = counts.get("pre", 0) + ("pre" in kw)     # a sandwich norm made in the add + norm
            return out
        return op

    class Fused(base):
        def rms_norm_op(self):
            return counted("rms_norm", PLATFORM.rms_norm_op())

        def fused_add_rms_norm_op(self):
            return counted("add_rms_norm", PLATFORM.fused_add_rms_norm_op())

        def rotary_kv_store_op(self):
            return counted("rotary_kv_store", PLATFORM.rotary_kv_store_op())

        def act_mul_op(self):
            return counted("act_mul", PLATFORM.act_mul_op())

    return Fused




def _decode(engine, prompts, n: int = 8):
    outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
                           return_logprob=True)
    return ([o["output_ids"] for o in outs], [[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in outs])


def _assert_parity(fast, slow, lp_tol: float) -> None:
    assert fast[0] == slow[0], (fast[0], slow[0])
    diff = max(abs(a - b) for fa, sa in zip(fast[1], slow[1]) for a, b in zip(fa, sa))
    assert diff < lp_tol, diff


PROMPTS = [[5, 17, 99, 3, 42], [7] * 11]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's engine test; on a GPU the native one runs")
@pytest.mark.parametrize("arch,kv", [("llama", "auto"), ("llama", "fp8_e4m3"), ("llama", "fp4_e2m1"),
                                     ("gemma3", "auto")])
def test_engine_greedy_tokens_equal_with_and_without_fused_ops(tiny_models, arch, kv) -> None:
    """CPU engine (bf16) through the fused ops in the interpreter vs the same engine on the torch path: equal
    greedy tokens, logprobs within bf16 noise; the ops ran (gemma3: act * up with gelu-tanh, the rotary store, its
    (1 + w) norms in the norm kernels and its sandwich norms inside the add + norm)."""
    from quantrt.engine.engine import Engine
    from quantrt.platforms.xpu.cpu_platform import CpuPlatform

    counts: dict[str, int] = {}
    kw = dict(model_path=str(tiny_models[arch][0]), dtype="bfloat16", kv_cache_dtype=kv, max_total_tokens=512,
              page_size=4, random_seed=0)
    fast = _decode(Engine(platform=_fused_platform(CpuPlatform, counts)(), **kw), PROMPTS)
    slow = _decode(Engine(platform=without_fused_layer_ops(CpuPlatform)(), **kw), PROMPTS)
    assert counts.get("rotary_kv_store", 0) > 0 and counts.get("act_mul", 0) > 0
    assert counts.get("add_rms_norm", 0) > 0 and counts.get("rms_norm", 0) > 0
    assert (counts.get("pre", 0) > 0) == (arch == "gemma3")
    _assert_parity(fast, slow, 2e-2)


@pytest.mark.accelerator
@pytest.mark.parametrize("kv", ["auto", "fp8_e4m3", "fp4_e2m1"])
def test_engine_greedy_tokens_equal_with_and_without_fused_ops_native(tiny_models, kv) -> None:
    """On the GPU: a bf16 tiny Llama with the CUDA platform's fused ops (and decode graphs) vs a CUDA platform that
    offers none of them (torch rotary, index_copy writes, torch add + norm, silu * up)."""
    from quantrt.engine.engine import Engine

    kw = dict(model_path=str(tiny_models["llama"][0]), dtype="bfloat16", kv_cache_dtype=kv, max_total_tokens=2048,
              page_size=16, random_seed=0)
    fast_eng = Engine(**kw)
    attn = fast_eng.model.model.layers[0].self_attn.attn
    assert attn._rotary_store is not None and attn._rotary_attend is not None    # decode: one launch for both
    fast = _decode(fast_eng, PROMPTS, 12)
    del fast_eng
    slow = _decode(Engine(platform=without_fused_layer_ops(CudaPlatform)(), **kw), PROMPTS, 12)
    _assert_parity(fast, slow, 5e-2)


@pytest.mark.accelerator
@pytest.mark.parametrize("kv", KV)
def test_rotary_kv_store_native_llama8b_shapes(kv) -> None:
    """Llama-3.1-8B attention shapes (32 q / 8 kv heads, d 128, llama3 rope), batch 64, natively vs the torch path."""
    from quantrt.platforms.cuda.kernels.rope_kv_triton import rotary_kv_store

    t, h, hkv, d, slots = 64, 32, 8, 128, 4096
    rope = _rope_tables(d, 8192, torch.bfloat16)
    q, k, v = _qkv(t, h, hkv, d, torch.bfloat16, seed=7)
    gen = torch.Generator().manual_seed(8)
    positions = torch.randint(0, 8192, (t,), generator=gen).to(DEV)
    out_slots = torch.randperm(slots, generator=gen)[:t].to(DEV)
    fused, ref = _pool(kv, hkv, d, slots), _pool(kv, hkv, d, slots)
    q_out = rotary_kv_store(q, k, v, *rope.half_tables(), positions, fused, 0, out_slots, 0.75, 1.5)
    q_ref, k_ref = rope(rope.tables(positions), q, k)
    ref.write(0, out_slots, k_ref, v, 0.75, 1.5)
    torch.testing.assert_close(q_out, q_ref, atol=0, rtol=2 ** -8)
    for a, b in [(fused.k[0], ref.k[0]), (fused.v[0], ref.v[0])] + list(zip(fused.k_sc + fused.v_sc,
                                                                             ref.k_sc + ref.v_sc)):
        assert (a == b).float().mean().item() > 0.99


@pytest.mark.accelerator
def test_add_norm_and_act_mul_native_llama8b_shapes() -> None:
    """hidden 4096 / MLP 14336 at batch 1 and 64, natively vs the torch math."""
    import torch.nn.functional as F

    from quantrt.platforms.cuda.layer_ops import triton_act_mul, triton_add_rms_norm

    gen = torch.Generator().manual_seed(9)
    for t in (1, 64):
        x, delta = (torch.randn(t, 4096, generator=gen).to(DEV, torch.bfloat16) for _ in range(2))
        w = (torch.rand(4096, generator=gen) + 0.5).to(DEV, torch.bfloat16)
        y, s = triton_add_rms_norm(x, delta, w, 1e-5)
        ref_s = x + delta
        sf = ref_s.float()
        ref_y = w * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
        assert torch.equal(s, ref_s)
        torch.testing.assert_close(y, ref_y, atol=0, rtol=2 ** -7)
        gu = torch.randn(t, 2 * 14336, generator=gen).to(DEV, torch.bfloat16)
        torch.testing.assert_close(triton_act_mul(gu), F.silu(gu[:, :14336]) * gu[:, 14336:], atol=2 ** -7, rtol=2 ** -7)


# -- paged decode attention: one split normalises in the decode kernel ------------------------------------
@pytest.mark.parametrize("kv", ["bf16", "fp8_e4m3"])
def test_single_split_decode_attention_equals_split_and_combine(kv) -> None:
    """With one split and no sinks the decode kernel writes the normalised output itself (no combine launch);
    it equals the two-kernel split-KV path on the same pool."""
    from quantrt.platforms.cuda.kernels.paged_attention_triton import kv_format, paged_decode_attention

    gen = torch.Generator().manual_seed(12)
    b, hkv, g, d, n = 2, 2, 2, 16, 40
    pool = _pool(kv, hkv, d, b * n)
    pool.write(0, torch.arange(b * n, device=DEV), torch.randn(b * n, hkv, d, generator=gen).to(DEV),
               torch.randn(b * n, hkv, d, generator=gen).to(DEV), 1.0, 1.0)
    slots = torch.arange(b * n, device=DEV).view(b, n)
    lens = torch.tensor([n, 23], device=DEV)
    q = torch.randn(b, hkv * g, d, generator=gen).to(DEV, torch.bfloat16)
    fmt, _ = kv_format(pool)
    one = paged_decode_attention(q, pool.k[0], pool.v[0], slots, lens, d ** -0.5, fmt, None, 1.0, 0.5,
                                 splits=1, block_l=16)
    three = paged_decode_attention(q, pool.k[0], pool.v[0], slots, lens, d ** -0.5, fmt, None, 1.0, 0.5,
                                   splits=3, block_l=16)
    torch.testing.assert_close(one.float(), three.float(), atol=2e-2, rtol=2e-2)
