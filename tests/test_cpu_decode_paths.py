"""CPU decode fast paths (issue 4 item 6): the fused RMSNorm op, rotary over q and k in one pass and the
int8 tied head of bf16/fp16 compute, each against a float64 reference."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from quantrt.layers.norm import RMSNorm
from quantrt.layers.rotary import RotaryEmbedding
from quantrt.platforms.xpu import cpu_ext
from quantrt.platforms.xpu.cpu_platform import CpuPlatform
from quantrt.quant.kernel import LinearSpec, select_linear_kernel
from quantrt.quant.weights import WEIGHT_ONLY, IntWeight


def _rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_cpu_rms_norm_op_matches_float64(dtype, tol) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-6)
    norm.weight.data = torch.randn(96)
    norm.finish_loading(dtype, CpuPlatform())
    assert norm._op is not None                                   # the fused op serves plain norms on CPU
    x = (torch.randn(5, 96) * 3).to(dtype)
    y = norm(x)
    assert y.dtype == dtype
    ref = _rms_ref(x, norm.weight.data.to(dtype), 1e-6)
    assert torch.allclose(y.double(), ref, rtol=tol, atol=tol)
    plain = RMSNorm(96, 1e-6)                                     # layers/norm.py's own ops, same semantics
    plain.weight.data = norm.weight.data.clone()
    plain.finish_loading(dtype)
    assert torch.equal(plain(x), y)   # fp32: torch's kernel; bf16/fp16: native, the same roundings at the same points


def test_cpu_rms_norm_op_only_on_the_cpu_platform() -> None:
    class Emulated(CpuPlatform):
        name = "npu"

    assert CpuPlatform().rms_norm_op() is not None and Emulated().rms_norm_op() is None


def _rope_ref(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox rotate-half rotation in float64 from the definition."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None, :]                                # [T, D/2]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x.double()[..., : d // 2], x.double()[..., d // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_rotary_fused_qk_matches_float64(dtype, tol) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    rope = RotaryEmbedding(cfg, 16, 64).to(dtype, torch.device("cpu"))
    t, h, hkv, d = 3, 4, 2, 16
    qkv = torch.randn(t, (h + 2 * hkv) * d).to(dtype)                      # one fused projection output
    q, k, _ = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    q, k = q.view(t, h, d), k.view(t, hkv, d)
    pos = torch.tensor([0, 7, 40])
    tables = rope.tables(pos)
    qr, kr = rope(tables, q, k)                                              # the one-pass (adjacent) path
    assert torch.allclose(qr.double(), _rope_ref(q, pos, 10000.0), rtol=tol, atol=tol)
    assert torch.allclose(kr.double(), _rope_ref(k, pos, 10000.0), rtol=tol, atol=tol)
    qs, ks = rope(tables, q.clone(), k.clone())                              # separate tensors: per-tensor path
    torch.testing.assert_close(qs, qr)
    torch.testing.assert_close(ks, kr)
    assert torch.equal(qkv.split([h * d, hkv * d, hkv * d], -1)[0].view(t, h, d), q)  # input untouched


def test_rotary_adjacency_is_strict() -> None:
    from quantrt.layers.rotary import _adjacent

    buf = torch.randn(2, 12, 8)
    assert _adjacent(buf[:, :8], buf[:, 8:10]) is not None
    assert _adjacent(buf[:, :8], buf[:, 9:11]) is None                      # a gap between q and k
    assert _adjacent(buf[:, :8], buf[:, 8:12].clone()) is None              # k in another buffer
    assert _adjacent(buf[:1, :8], buf[1:, 8:10]) is None                    # different rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_tied_head_matches_float64(dtype) -> None:
    torch.manual_seed(0)
    emb = torch.randn(1000, 64) * torch.rand(1000, 1)                      # rows of different magnitude
    plat = CpuPlatform()
    qw = plat.tied_head_weight(emb, dtype)
    assert isinstance(qw, IntWeight) and qw.bits == 8 and qw.group_size == 64 and qw.codes.dtype == torch.int8
    spec = LinearSpec(qw, WEIGHT_ONLY, dtype)
    kernel = select_linear_kernel(spec, plat).kernel.prepare(spec, plat)
    x = torch.randn(3, 64).to(dtype)
    y = kernel.apply(x, None)
    assert y.shape == (3, 1000) and y.dtype == dtype
    w64 = qw.codes.double() * qw.scale.double()                             # the quantized weight, exactly
    ref = x.double() @ w64.T
    assert (y.double() - ref).abs().max() <= 0.02 * ref.abs().max()
    # the quantization itself: each weight within half a step of its row
    assert ((w64 - emb.double()).abs() <= qw.scale.double() / 2 + 1e-7).all()


def test_int8_tied_head_only_for_cpu_16bit_compute() -> None:
    class Emulated(CpuPlatform):
        name = "rocm"

    emb = torch.randn(32, 16)
    assert CpuPlatform().tied_head_weight(emb, torch.float32) is None          # fp32 keeps the exact dense head
    assert Emulated().tied_head_weight(emb, torch.bfloat16) is None            # emulations keep their head
    assert CpuPlatform().tied_head_weight(emb.to(torch.int8), torch.bfloat16) is None


_NATIVE_HEAD = "CpuNativeIntKernel" if cpu_ext.load() else None   # the native extension takes GGUF heads


@pytest.mark.parametrize(("kw", "quantized_head"), [
    ({"dtype": "bfloat16"}, False),                                       # float checkpoint: exact dense head
    ({"dtype": "bfloat16", "torchao_config": "int8wo"}, False),           # online quantization: dense head too
    ({"dtype": "bfloat16", "gguf": True}, _NATIVE_HEAD or True),          # GGUF with a Q8_0 token_embd: int8
    ({"dtype": "float32", "gguf": True}, _NATIVE_HEAD or False)])         # (native: its Q8_0 blocks, any dtype)
def test_int8_tied_head_only_where_the_checkpoint_stores_it_quantized(tiny_models, tmp_path, kw,
                                                                       quantized_head) -> None:
    from quantrt.engine.engine import Engine
    from tests import test_gguf_loader

    kw = dict(kw)
    if kw.pop("gguf", False):
        path, tok = tmp_path / "tiny-q4_1.gguf", str(tiny_models["llama"][0])
        test_gguf_loader.write_tiny_gguf(path, "llama")                  # tied, Q4_1 linears, token_embd Q8_0
        eng = Engine(model_path=str(path), tokenizer_path=tok, max_total_tokens=256, **kw)
    else:
        eng = Engine(model_path=str(tiny_models["llama_tied"][0]), max_total_tokens=256, **kw)
    try:
        assert eng.model.lm_head is None
        name = type(eng.model.tied_head).__name__
        if isinstance(quantized_head, str):
            assert name == quantized_head
        else:
            assert ("Int8" in name) == quantized_head, name
    finally:
        eng.shutdown()
