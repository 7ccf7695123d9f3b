"""AWQ / GPTQ checkpoints written in their real on-disk layout by our packer: exact unpacking, v1/v2
zeros, act-order, bad inputs, and the packed int4 CPU kernel against the reference kernel."""

from __future__ import annotations

import pytest
import torch

from quantrt.errors import CheckpointError, ConfigError
from quantrt.platform.resolve import current_platform
from quantrt.platforms.xpu import cpu_ext
from quantrt.quant.format import get_format
from quantrt.quant.formats.packing import pack_awq, pack_lsb
from quantrt.quant.kernel import LinearSpec, select_linear_kernel
from quantrt.quant.kernels.reference import ReferenceLinearKernel
from quantrt.quant.weights import WEIGHT_ONLY

N, K = 64, 256


def _rtn(w: torch.Tensor, bits: int, g: int, sym: bool):
    """Reference RTN: w [N, K] -> codes [N, K], scale [N, K/g], zero [N, K/g] (ints)."""
    n, k = w.shape
    wg = w.reshape(n, k // g, g)
    qmax = (1 << bits) - 1
    if sym:
        s = wg.abs().amax(-1) / ((qmax + 1) // 2 - 0.5)
        z = torch.full_like(s, (qmax + 1) // 2)
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)
        s = (hi - lo) / qmax
        z = (-lo / s).round().clamp(0, qmax)
    q = (wg / s[..., None] + z[..., None]).round().clamp(0, qmax)
    return q.reshape(n, k).to(torch.uint8), s.half().float(), z.to(torch.int64)


def _dequant(q, s, z, g):
    return (q.float() - z.float().repeat_interleave(g, 1)) * s.repeat_interleave(g, 1)


def _gptq_tensors(q, s, z, bits, v1=True, g_idx=None):
    zs = (z - 1) if v1 else z
    return {"qweight": pack_lsb(q.t().contiguous(), bits, 0), "qzeros": pack_lsb(zs.t().to(torch.uint8), bits, 1),
            "scales": s.t().half().contiguous(), **({"g_idx": g_idx} if g_idx is not None else {})}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("v2", [False, True])
def test_gptq_exact(bits, sym, v2):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(bits))
    g = 32
    q, s, z = _rtn(w, bits, g, sym)
    if v2 is False and bool((z == 0).any()):
        z = z.clamp(min=1)  # v1 cannot store a true zero of 0 (it stores z - 1)
    fmt = get_format("gptq").from_config({"quant_method": "gptq", "bits": bits, "group_size": g, "sym": sym,
                                          "checkpoint_format": "gptq_v2" if v2 else "gptq"})
    qw = fmt.make_weight("l", _gptq_tensors(q, s, z, bits, not v2), (N, K))
    assert torch.equal(qw.dequantize(), _dequant(q, s, z, g))


def test_gptq_per_channel_and_act_order():
    w = torch.randn(N, K)
    q, s, z = _rtn(w, 4, K, True)
    fmt = get_format("gptq_marlin").from_config({"quant_method": "gptq", "bits": 4, "group_size": -1})
    assert torch.equal(fmt.make_weight("l", _gptq_tensors(q, s, z, 4), (N, K)).dequantize(), _dequant(q, s, z, K))
    # desc_act: a permuted group table; the weight of column k uses group g_idx[k]
    g = 64
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(1))
    g_idx = (torch.argsort(perm) // g).to(torch.int32)
    q, s, z = _rtn(w, 4, g, False)
    fmt = get_format("gptq").from_config({"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": True,
                                          "sym": False, "checkpoint_format": "gptq_v2"})
    qw = fmt.make_weight("l", _gptq_tensors(q, s, z, 4, False, g_idx), (N, K))
    ref = (q.float() - z.float()[:, g_idx.long()]) * s[:, g_idx.long()]
    assert torch.equal(qw.dequantize(), ref)
    _check_kernel(qw, expect=INT4)


@pytest.mark.parametrize("fmt_name", ["gptq", "awq"])
def test_partial_last_group(fmt_name):
    """G does not divide K (auto-round's g128 export of K=576): ceil(K/G) groups, the last one short; the
    weight dequantizes exactly like the per-column reference, and the kernels see group gcd(G, K)."""
    k, g = 192, 128
    w = torch.randn(N, k)
    wp = torch.cat([w, torch.zeros(N, 2 * g - k)], 1)                    # pad to whole groups for the RTN
    q, s, z = _rtn(wp, 4, g, False)
    q = q[:, :k]
    z = z.clamp(min=1)
    ref = (q.float() - z.float()[:, torch.arange(k) // g]) * s[:, torch.arange(k) // g]
    if fmt_name == "gptq":
        fmt = get_format("gptq").from_config({"quant_method": "gptq", "bits": 4, "group_size": g, "sym": False})
        tensors = _gptq_tensors(q, s, z, 4)
    else:
        fmt = get_format("awq").from_config({"quant_method": "awq", "bits": 4, "group_size": g})
        tensors = {"qweight": pack_awq(q.t().contiguous()), "qzeros": pack_awq(z.t().to(torch.uint8).contiguous()),
                   "scales": s.t().half().contiguous()}
    qw = fmt.make_weight("l", tensors, (N, k))
    assert qw.group_size == 64 and torch.equal(qw.dequantize(), ref)


def test_awq_exact_and_marlin_spelling():
    w = torch.randn(N, K)
    q, s, z = _rtn(w, 4, 128, False)
    tensors = {"qweight": pack_awq(q.t().contiguous()), "qzeros": pack_awq(z.t().to(torch.uint8).contiguous()),
               "scales": s.t().half().contiguous()}
    for name in ("awq", "awq_marlin"):
        fmt = get_format(name).from_config({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True})
        qw = fmt.make_weight("model.layers.0.mlp.up_proj", dict(tensors), (N, K))
        assert torch.equal(qw.dequantize(), _dequant(q, s, z, 128))
    _check_kernel(qw, expect=INT4)
    assert not fmt.is_quantized("lm_head")


INT4 = "cpu_native_int" if cpu_ext.load() else "cpu_int4_packed"   # the native extension goes first


def _check_kernel(qw, expect: str) -> None:
    plat = current_platform()
    x = torch.randn(3, K)
    for dtype in (torch.bfloat16, torch.float32):
        spec = LinearSpec(qw, WEIGHT_ONLY, dtype)
        choice = select_linear_kernel(spec, plat)
        if dtype == torch.bfloat16:
            assert choice.kernel.name == expect, choice.explain()
        y = choice.kernel.prepare(spec, plat).apply(x.to(dtype), None).float()
        ref = ReferenceLinearKernel.prepare(LinearSpec(qw, WEIGHT_ONLY, torch.float32), plat).apply(x, None)
        err = float((y - ref).norm() / ref.norm())
        assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), (dtype, choice.kernel.name, err)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="bits=5"):
        get_format("gptq").from_config({"quant_method": "gptq", "bits": 5, "group_size": 128})
    with pytest.raises(ConfigError, match="4-bit"):
        get_format("awq").from_config({"quant_method": "awq", "bits": 8, "group_size": 128})
    with pytest.raises(ConfigError, match="checkpoint_format 'exllama' is not one of gptq, gptq_v2, marlin"):
        get_format("gptq").from_config({"quant_method": "gptq", "bits": 4, "checkpoint_format": "exllama"})
    fmt = get_format("gptq").from_config({"quant_method": "gptq", "bits": 4, "group_size": 100})
    q, s, z = _rtn(torch.randn(N, 200), 4, 100, True)                  # 2 groups; K=256 needs ceil(256/100)=3
    with pytest.raises(CheckpointError, match=r"qzeros has shape \(2, 8\), expected \(3, 8\); group size 100 "
                                              r"does not divide K=256 \(a partial last group\)"):
        fmt.make_weight("l", {**_gptq_tensors(q, s, z, 4), "qweight": torch.zeros(32, N, dtype=torch.int32)}, (N, K))
    with pytest.raises(CheckpointError, match="l.qweight is missing"):
        fmt.make_weight("l", {}, (N, K))
    fmt = get_format("gptq").from_config({"quant_method": "gptq", "bits": 4, "group_size": 32})
    q, s, z = _rtn(torch.randn(N, K), 4, 32, True)
    t = _gptq_tensors(q, s, z, 4)
    t["qweight"] = t["qweight"][:-1]
    with pytest.raises(CheckpointError, match="qweight has shape"):
        fmt.make_weight("l", t, (N, K))
