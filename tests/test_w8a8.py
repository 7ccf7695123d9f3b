"""w8a8_int8 / w8a8_fp8 online on float checkpoints, and the CPU integer kernels against the reference."""

from __future__ import annotations

import pytest
import torch

from quantrt.engine.engine import Engine
from quantrt.layers.linear import QuantLinear
from quantrt.platforms.xpu.cpu_kernels import CpuInt8WeightOnlyKernel, CpuIntEmulatedKernel
from quantrt.platforms.xpu.cpu_platform import CpuPlatform
from quantrt.quant.formats.w8a8 import quantize_int8_channel
from quantrt.quant.kernel import LinearSpec
from quantrt.quant.kernels.reference import ReferenceLinearKernel
from quantrt.quant.weights import WEIGHT_ONLY, ActKind, ActScheme, IntWeight
from tests.test_fp8_engine import _hf_weight, sqnr_db

INT8_TOKEN = ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8)


def _kl_vs_float(engine: Engine, hf) -> float:
    """Mean KL(float || quantized) of next-token distributions over a short prompt."""
    ids = list(range(5, 40))
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1}, return_logprob=True,
                          logprob_start_len=0, top_logprobs_num=engine.config.vocab_size)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    kls = []
    for pos, tops in enumerate(out["meta_info"]["input_top_logprobs"][1:]):
        ours = torch.full_like(ref[pos], float("-inf"))
        for lp, tok, _ in tops:
            ours[tok] = lp
        kls.append(float((ref[pos].exp() * (ref[pos] - ours)).sum()))
    return sum(kls) / len(kls)


@pytest.mark.parametrize(("method", "kernel", "min_db"), [
    ("w8a8_int8", "cpu_int_emulated", 30.0), ("w8a8_fp8", "cpu_fp8_emulated", 25.0)])
def test_online_w8a8_through_the_engine(tiny_models, method, kernel, min_db):
    path, hf = tiny_models["llama"]
    eng = Engine(model_path=str(path), quantization=method, max_total_tokens=2048)
    assert eng.quant_method == method
    torch.manual_seed(0)
    for layer in (m for m in eng.model.modules() if isinstance(m, QuantLinear)):
        if layer.shards[0][0] == "lm_head":
            assert not layer.is_quantized
            continue
        assert layer.is_quantized and layer.kernel_desc.startswith(kernel), layer.kernel_desc
        x = torch.randn(8, layer.in_features)
        assert sqnr_db(x.double() @ _hf_weight(hf, layer).double().T, layer(x)) >= min_db
    assert _kl_vs_float(eng, hf) < 0.01


def _spec(w: IntWeight, act: ActScheme, dtype: torch.dtype = torch.float32) -> LinearSpec:
    return LinearSpec(w, act, dtype)


@pytest.mark.parametrize("m", [1, 5, 33])
def test_int8_kernels_match_the_reference(m):
    torch.manual_seed(0)
    w = quantize_int8_channel(torch.randn(96, 64))
    x, b = torch.randn(m, 64), torch.randn(96)
    plat = CpuPlatform()
    for act, kern, tol in ((INT8_TOKEN, CpuIntEmulatedKernel, 1e-5), (WEIGHT_ONLY, CpuIntEmulatedKernel, 1e-5),
                           (WEIGHT_ONLY, CpuInt8WeightOnlyKernel, 1e-2)):
        spec = _spec(w, act)
        assert kern.can_implement(spec, plat) == (True, "")
        ref = ReferenceLinearKernel.prepare(spec, plat).apply(x, b)
        got = kern.prepare(spec, plat).apply(x, b)
        assert ((got - ref).norm() / ref.norm()).item() < tol, (kern.name, act)


def test_int8_weight_only_kernel_rejections():
    w = quantize_int8_channel(torch.randn(32, 64))
    plat = CpuPlatform()
    ok, why = CpuInt8WeightOnlyKernel.can_implement(_spec(w, INT8_TOKEN), plat)
    assert not ok and "weight-only" in why
    grouped = IntWeight(w.codes, w.scale.expand(32, 2).contiguous(), 8, 32)
    ok, why = CpuInt8WeightOnlyKernel.can_implement(_spec(grouped, WEIGHT_ONLY), plat)
    assert not ok and "per-channel" in why
    assert CpuIntEmulatedKernel.can_implement(_spec(grouped, WEIGHT_ONLY), plat)[0]


def test_quantize_int8_channel_roundtrip():
    w = torch.randn(16, 48)
    q = quantize_int8_channel(w)
    assert q.codes.dtype == torch.int8 and q.scale.shape == (16, 1) and int(q.codes.abs().max()) == 127
    assert (q.dequantize() - w).abs().max() <= q.scale.max() / 2 + 1e-6
