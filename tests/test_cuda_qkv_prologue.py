"""The q/k/v projection's bias and the per-head q/k norms (Qwen2, Qwen3, Gemma 3) made inside the CUDA decode
attention's load of q, k and v (`QKVPrologue`, `NewToken.bias` / `norm`): against the layers' own math followed by
the unfused launches (rotary_kv_store, then the attention), for every KV format, with and without the early reads;
the guard that decides when the kernel takes them; and tiny Qwen2 / Qwen3 / Gemma 3 engines decoding through the
fused op with the prologue in the kernel and in the layers. Triton's interpreter without a GPU; `-m accelerator`
at Qwen-7B/8B attention shapes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests._cuda_env import DEV, NEEDS_TRITON
from tests.test_cuda_fused_layer import KV, PROMPTS, _decode
from tests.test_cuda_rope_attention import _step

pytestmark = NEEDS_TRITON


def _norm(x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """The layers' RMSNorm over head_dim, rounded as `RMSNorm.forward` / `triton_rms_norm` round it."""
    xf = x.float()
    r = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (r * w.float()).to(x.dtype) if gemma else (r.to(x.dtype).float() * w.float()).to(x.dtype)


def _prologue(h: int, hkv: int, d: int, bias: bool, qkn: int, seed: int):
    """(bias (q, k, v) or None, norm (q weight, k weight, eps, kind) or None) for NewToken."""
    gen = torch.Generator().manual_seed(seed)
    b = tuple((torch.randn(n * d, generator=gen) * 3).to(DEV, torch.bfloat16) for n in (h, hkv, hkv)) if bias else None
    if not qkn:
        return b, None
    dt = torch.float32 if qkn == 2 else torch.bfloat16          # Gemma's (1 + w) in fp32; else w in the model dtype
    w = [(torch.rand(d, generator=gen) + 0.5).to(DEV, dt) for _ in range(2)]
    return b, (w[0], w[1], 1e-6, qkn)


def _apply(q, k, v, bias, norm):
    if bias is not None:
        q, k, v = q + bias[0].view(q.shape[1:]), k + bias[1].view(k.shape[1:]), v + bias[2].view(v.shape[1:])
    if norm is not None:
        q, k = _norm(q, norm[0], norm[2], norm[3] == 2), _norm(k, norm[1], norm[2], norm[3] == 2)
    return q, k, v


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("bias,qkn", [(True, 0), (False, 1), (False, 2), (True, 1)])
@pytest.mark.parametrize("early", ["1", "0"])
def test_attention_adds_the_bias_and_norms_q_and_k_as_the_layers_do(kv, bias, qkn, early, monkeypatch):
    from quantrt.platforms.cuda.kernels import paged_attention_triton as P
    from quantrt.platforms.cuda.kernels.paged_attention_triton import (
        NewToken,
        kv_format,
        paged_decode_attention,
    )
    from quantrt.platforms.cuda.kernels.rope_kv_triton import pool_format, rotary_kv_store

    monkeypatch.setenv("QUANTRT_CUDA_ATTN_EARLY", early)
    monkeypatch.setattr(P, "EARLY_MAX_PROGRAMS", 1000)
    h, hkv, d = 4, 2, 32
    pools, kv_slots, lens, positions, out_slots, (q, k, v), rope, (ks, vs) = _step(kv, [1, 33, 70], h, hkv, d, 5)
    cos, sin = rope.half_tables()
    pb, pn = _prologue(h, hkv, d, bias, qkn, 11)
    two, one = pools
    fmt, _ = kv_format(two)
    sc = (lambda p: dict(k_sc=p.k_sc[0], v_sc=p.v_sc[0])) if kv == "fp4_e2m1" else (lambda p: {})
    kw = dict(k_scale=ks, v_scale=vs, splits=3, block_l=16)
    qa, ka, va = _apply(q, k, v, pb, pn)                       # the layers' ops, then the two launches
    qr = rotary_kv_store(qa, ka, va, cos, sin, positions, two, 0, out_slots, ks, vs)
    ref = paged_decode_attention(qr, two.k[0], two.v[0], kv_slots, lens, d ** -0.5, fmt, **kw, **sc(two))
    new = NewToken(k, v, cos, sin, positions, out_slots, pool_format(one)[0], bias=pb, norm=pn)
    got = paged_decode_attention(q, one.k[0], one.v[0], kv_slots, lens, d ** -0.5, fmt, new=new, **kw, **sc(one))
    # the kernel's rsqrt and sums may differ from torch's in the last fp32 bit: a rounded value can move one ulp
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert (got == ref).float().mean().item() > 0.9
    for a, b in [(one.k[0], two.k[0]), (one.v[0], two.v[0])]:
        assert (a == b).float().mean().item() > 0.97
    # without them the result is another one (so the comparison above can fail)
    plain = NewToken(k, v, cos, sin, positions, out_slots, pool_format(one)[0])
    other = paged_decode_attention(q, pools[0].k[0].clone(), pools[0].v[0].clone(), kv_slots, lens, d ** -0.5, fmt,
                                   new=plain, **kw, **sc(one))
    assert (other.float() - ref.float()).abs().max() > 0.1


def _layer(d: int):
    return SimpleNamespace(head_dim=d, layer_id=0, scale=d ** -0.5, window=None, k_scale=1.0, v_scale=1.0)


def test_the_op_takes_plain_norms_and_leaves_the_rest_to_the_layers(monkeypatch):
    """Plain RMSNorms (weight or Gemma's 1 + w) and any bias go into the kernel; a norm with a bias of its own, a
    subclass with other rounding, or q and k norms that differ in eps stay in the layers; the switch turns it off."""
    from quantrt.layers.norm import RMSNorm
    from quantrt.layers.qkv_prologue import QKVPrologue
    from quantrt.platforms.cuda.kernels.decode_attention_op import decode_rotary_attention
    from quantrt.platforms.cuda.platform import CudaPlatform

    takes = decode_rotary_attention.takes_prologue
    layer = _layer(32)

    def norms(eps=(1e-6, 1e-6), offset=False, cls=RMSNorm):
        out = [cls(32, e, offset=offset) for e in eps]
        for n in out:
            n.finish_loading(torch.bfloat16)
        return out

    assert takes(layer, QKVPrologue((torch.zeros(1),) * 3))
    assert takes(layer, QKVPrologue(None, *norms())) and takes(layer, QKVPrologue(None, *norms(offset=True)))
    assert not takes(layer, QKVPrologue(None, *norms(eps=(1e-6, 1e-5))))
    biased = norms()
    biased[0].enable_bias()
    assert not takes(layer, QKVPrologue(None, *biased))

    class Fp32Norm(RMSNorm):
        pass

    assert not takes(layer, QKVPrologue(None, *norms(cls=Fp32Norm)))
    monkeypatch.setenv("QUANTRT_CUDA_QKV_PROLOGUE", "0")
    assert not takes(layer, QKVPrologue((torch.zeros(1),) * 3))
    assert CudaPlatform.decode_rotary_attention_op is not None


def test_prologue_apply_is_the_layers_math():
    """`QKVPrologue.apply` (the fallback when the op declines a step) adds the bias per part and norms q and k."""
    from quantrt.layers.norm import RMSNorm
    from quantrt.layers.qkv_prologue import QKVPrologue

    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 6 * 16, generator=gen).to(torch.bfloat16)
    bias = torch.randn(6 * 16, generator=gen).to(torch.bfloat16)
    qn, kn = RMSNorm(16, 1e-6), RMSNorm(16, 1e-6)
    for n in (qn, kn):
        n.weight.data = torch.rand(16, generator=gen) + 0.5
        n.finish_loading(torch.bfloat16)
    pre = QKVPrologue(tuple(bias.split([64, 16, 16])), qn, kn)
    q, k, v = (t.view(2, -1, 16) for t in qkv.split([64, 16, 16], -1))
    got = pre.apply(q, k, v)
    full = (qkv + bias).split([64, 16, 16], -1)
    want = (qn(full[0].view(2, 4, 16)), kn(full[1].view(2, 1, 16)), full[2].view(2, 1, 16))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def _fused_attention_platform(counts: dict[str, int]):
    """The CPU platform with the CUDA fused rotary + KV write + attention op (the interpreter runs it on CPU
    tensors), counting the steps it served and those that carried the prologue."""
    from quantrt.platforms.cuda.kernels.decode_attention_op import decode_rotary_attention
    from quantrt.platforms.xpu.cpu_platform import CpuPlatform

    def op(*a, **kw):
        out = decode_rotary_attention(*a, **kw)
        counts["served"] = counts.get("served", 0) + (out is not None)
        counts["pre"] = counts.get("pre", 0) + (out is not None and kw.get("pre") is not None)
        return out

    op.runs_on_cpu = True
    op.small_grid = decode_rotary_attention.small_grid
    op.takes_prologue = decode_rotary_attention.takes_prologue

    class Fused(CpuPlatform):
        def decode_rotary_attention_op(self):
            return op

    return Fused


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's engine test; on a GPU the native one runs")
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3"])
def test_engine_decodes_the_same_with_the_prologue_in_the_kernel(tiny_models, arch, monkeypatch):
    """A bf16 engine whose decode attention is the CUDA op: with the bias / q-k norms in the kernel (the default)
    and in the layers (QUANTRT_CUDA_QKV_PROLOGUE=0) the greedy tokens are equal and the logprobs within bf16
    noise, and the first run's steps carried the prologue."""
    from quantrt.engine.engine import Engine

    kw = dict(model_path=str(tiny_models[arch][0]), dtype="bfloat16", max_total_tokens=512, page_size=4,
              random_seed=0, disable_cuda_graph=True)
    fused: dict[str, int] = {}
    fast = _decode(Engine(platform=_fused_attention_platform(fused)(), **kw), PROMPTS, 6)
    monkeypatch.setenv("QUANTRT_CUDA_QKV_PROLOGUE", "0")
    layers: dict[str, int] = {}
    slow = _decode(Engine(platform=_fused_attention_platform(layers)(), **kw), PROMPTS, 6)
    assert fused.get("pre", 0) > 0 and fused["pre"] == fused["served"]
    assert layers.get("served", 0) > 0 and layers.get("pre", 0) == 0
    assert fast[0] == slow[0], (fast[0], slow[0])
    assert max(abs(a - b) for fa, sa in zip(fast[1], slow[1]) for a, b in zip(fa, sa)) < 2e-2


@pytest.mark.accelerator
@pytest.mark.parametrize("shape", [(28, 4, True, 0), (32, 8, False, 1)])   # Qwen2.5-7B, Qwen3-8B
@pytest.mark.parametrize("b", [1, 64])
def test_prologue_in_the_attention_native(shape, b):
    from quantrt.platforms.cuda.kernels.paged_attention_triton import (
        NewToken,
        kv_format,
        paged_decode_attention,
    )
    from quantrt.platforms.cuda.kernels.rope_kv_triton import pool_format, rotary_kv_store
    from quantrt.platforms.cuda.layer_ops import triton_rms_norm

    h, hkv, bias, qkn = shape
    d = 128
    lens = [int(x) for x in torch.randint(1, 300, (b,), generator=torch.Generator().manual_seed(b))]
    pools, kv_slots, lens_t, positions, out_slots, (q, k, v), rope, _ = _step("bf16", lens, h, hkv, d, b)
    cos, sin = rope.half_tables()
    pb, pn = _prologue(h, hkv, d, bias, qkn, b)
    two, one = pools
    fmt, _ = kv_format(two)
    qa, ka, va = _apply(q, k, v, pb, None)
    if pn is not None:      # the engine's unfused path on the GPU: the platform's norm kernel (its rsqrt too)
        qa, ka = triton_rms_norm(qa, pn[0], pn[2]), triton_rms_norm(ka, pn[1], pn[2])
    qr = rotary_kv_store(qa, ka, va, cos, sin, positions, two, 0, out_slots)
    ref = paged_decode_attention(qr, two.k[0], two.v[0], kv_slots, lens_t, d ** -0.5, fmt)
    new = NewToken(k, v, cos, sin, positions, out_slots, pool_format(one)[0], bias=pb, norm=pn)
    got = paged_decode_attention(q, one.k[0], one.v[0], kv_slots, lens_t, d ** -0.5, fmt, new=new)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert (got == ref).float().mean().item() > 0.5, (got == ref).float().mean().item()
    assert (one.k[0] == two.k[0]).float().mean().item() > 0.99 and torch.equal(one.v[0], two.v[0])
