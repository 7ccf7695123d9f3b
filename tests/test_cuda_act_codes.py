"""Activation codes made by the op before a W8A8 linear (`LinearKernel.row_codes`, `QuantizedRows`): which rows the
CUDA W8A8 kernel asks for them, its errors, and an engine whose norms and act * mul make the codes against the same
engine whose linears make them (bit-equal logprobs). Without a GPU in Triton's interpreter; `-m accelerator` runs
the engine natively and the Llama-shape dispatch (frag_w8, codes_mm, cuBLASLt) on handed-over codes."""

from __future__ import annotations

import pytest
import torch

from tests._cuda_env import DEV, NEEDS_TRITON, PLATFORM

pytestmark = NEEDS_TRITON
FP8 = torch.float8_e4m3fn


def _kernel(n: int, k: int, dtype: torch.dtype, static: bool = False):
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.quantize import quantize_fp8
    from quantrt.quant.weights import ActKind, ActScheme, IntWeight

    g = torch.Generator().manual_seed(n + k)
    if dtype == torch.int8:
        w = IntWeight(torch.randint(-127, 128, (n, k), generator=g).to(torch.int8).to(DEV),
                      (torch.rand(n, 1, generator=g) * 0.01 + 1e-3).to(DEV), 8, k)
    else:
        w = quantize_fp8(torch.randn(n, k, generator=g) * 0.02, "channel", None)
        w = type(w)(w.data.to(DEV), w.scale.to(DEV), w.granularity, w.block)
    act = (ActScheme(ActKind.STATIC_TENSOR, dtype, scale=torch.tensor(0.02)) if static
           else ActScheme(ActKind.DYNAMIC_TOKEN, dtype))
    return TritonW8A8Kernel.prepare(LinearSpec(w, act, torch.bfloat16), PLATFORM)


def test_row_codes_only_where_the_path_runs_on_codes() -> None:
    """int8 at M >= 64 runs on codes (cuBLASLt int8 or codes_mm): row_codes asks for them; at M = 2 the path
    quantizes inside (no request); fp8 weight-only never asks."""
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.quantize import quantize_fp8
    from quantrt.quant.weights import WEIGHT_ONLY

    kern = _kernel(96, 256, torch.int8)
    rc = kern.row_codes(64)
    assert rc is not None and rc.dtype == torch.int8 and rc.qmax == 127.0 and rc.static_scale is None
    assert kern.row_codes(2) is None and kern._plan(2)[0] == "swap"
    static = _kernel(96, 256, torch.int8, static=True).row_codes(80)
    assert static is not None and static.static_scale.item() == pytest.approx(0.02)
    w = quantize_fp8(torch.randn(96, 256), "channel", None)
    w = type(w)(w.data.to(DEV), w.scale.to(DEV), w.granularity, w.block)
    wonly = TritonW8A8Kernel.prepare(LinearSpec(w, WEIGHT_ONLY, torch.bfloat16), PLATFORM)
    assert wonly.row_codes(64) is None and wonly.row_codes(1) is None


def test_handed_over_codes_give_the_same_output() -> None:
    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows
    from quantrt.quant.kernel import QuantizedRows

    kern = _kernel(96, 256, torch.int8)
    x = torch.randn(70, 256, generator=torch.Generator().manual_seed(0)).to(DEV, torch.bfloat16)
    q, s = quant_rows(x, torch.int8, 127.0)
    assert torch.equal(kern.apply(QuantizedRows(q, s), None), kern.apply(x, None))


def test_codes_at_a_path_that_quantizes_inside_are_refused() -> None:
    from quantrt.quant.kernel import QuantizedRows

    kern = _kernel(96, 256, torch.int8)
    q = torch.zeros(2, 256, dtype=torch.int8, device=DEV)
    with pytest.raises(ValueError, match=r"triton_w8a8: activation codes torch.int8 were handed over at M=2, where "
                                         r"this layer takes torch.int8 codes on the paths ring, frag, codes, scaled_mm, "
                                         r"int_mm \(its path is swap\): ask row_codes\(M\) first"):
        kern.apply(QuantizedRows(q, torch.ones(2, 1, device=DEV)), None)
    with pytest.raises(ValueError, match="activation codes torch.float8_e4m3fn were handed over at M=64"):
        kern.apply(QuantizedRows(torch.zeros(64, 256, device=DEV).to(FP8), torch.ones(64, 1, device=DEV)), None)


# -- engine: the norms / act * mul make the codes vs the linears make them ---------------------------------------
def _platform(base: type, codes: bool, counts: dict[str, int]):
    """`base` with the CUDA W8A8 kernel first and the CUDA layer ops; `codes`: its norm / act * mul ops make the next
    linear's codes (counted when they do), else they offer none."""
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.quant.kernel import QuantizedRows

    def counted(fn):
        def op(*a, **kw):
            out = fn(*a, **kw)
            made = out[0] if isinstance(out, tuple) else out                  # the norm: (codes, residual)
            counts["codes"] = counts.get("codes", 0) + isinstance(made, QuantizedRows)
            return out
        return op

    class P(base):
        def linear_kernels(self):
            return [TritonW8A8Kernel, *super().linear_kernels()]

        def fused_add_rms_norm_op(self):
            return PLATFORM.fused_add_rms_norm_op()

        def act_mul_op(self):
            return PLATFORM.act_mul_op()

        def fused_add_rms_norm_codes_op(self):
            return counted(PLATFORM.fused_add_rms_norm_codes_op()) if codes else None

        def act_mul_codes_op(self):
            return counted(PLATFORM.act_mul_codes_op()) if codes else None

    return P()


def _generate(engine, prompts, n: int):
    outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": n, "temperature": 0,
                                                               "ignore_eos": True}, return_logprob=True)
    return [(o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]) for o in outs]


LONG = [[(7 * i) % 60 + 3 for i in range(70)]]    # a 70-token prefill: M >= 64, the int8 path on codes


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's engine test; on a GPU the native one runs")
def test_engine_int8_codes_from_the_norms_equal_the_linears_own(tiny_models) -> None:
    """A tiny Llama quantized online to w8a8_int8, the CUDA W8A8 kernel in the interpreter: the 70-token prefill's
    qkv / gate_up / down take codes made by the add + norm and act * mul; tokens and logprobs equal bit for bit
    to the engine whose linears quantize themselves."""
    from quantrt.engine.engine import Engine
    from quantrt.platforms.xpu.cpu_platform import CpuPlatform

    kw = dict(model_path=str(tiny_models["llama"][0]), dtype="bfloat16", quantization="w8a8_int8",
              max_total_tokens=512, page_size=4, random_seed=0)
    counts: dict[str, int] = {}
    eng = Engine(platform=_platform(CpuPlatform, True, counts), **kw)
    assert eng.model.model.layers[0].mlp.down_proj.kernel_desc.startswith("triton_w8a8")
    fused = _generate(eng, LONG, 3)
    assert counts["codes"] == 5           # prefill: 3 add + norms (not layer 0's input norm), 2 act * mul
    plain = _generate(Engine(platform=_platform(CpuPlatform, False, {}), **kw), LONG, 3)
    assert fused == plain


@pytest.mark.accelerator
@pytest.mark.parametrize("method", ["w8a8_fp8", "w8a8_int8"])
def test_engine_codes_from_the_norms_native(tiny_models, method, monkeypatch) -> None:
    """On the GPU (decode graphs on): the fused codes against QUANTRT_CUDA_FUSED_CODES=0, bit-equal tokens and
    logprobs with a long prefill (cuBLASLt / codes_mm on codes) and a batch of short ones."""
    from quantrt.engine.engine import Engine

    kw = dict(model_path=str(tiny_models["llama"][0]), dtype="bfloat16", quantization=method,
              max_total_tokens=4096, page_size=16, random_seed=0)
    prompts = LONG + [[5, 17, 99, 3, 42], [7] * 11, [9, 8]]
    fused = _generate(Engine(**kw), prompts, 6)
    monkeypatch.setenv("QUANTRT_CUDA_FUSED_CODES", "0")
    assert fused == _generate(Engine(**kw), prompts, 6)


@pytest.mark.accelerator
@pytest.mark.parametrize("dtype", [FP8, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("m,k,n", [(4, 8192, 8192), (8, 4096, 28672), (16, 14336, 4096), (64, 4096, 6144),
                                   (128, 4096, 4096)])
def test_llama_shapes_on_handed_over_codes_native(dtype, m, k, n) -> None:
    """frag_w8 / codes_mm / cuBLASLt on codes from the norm kernel equal the kernel's own quantization, bit for bit."""
    from quantrt.platforms.cuda.layer_ops import triton_add_rms_norm

    kern = _kernel(n, k, dtype)
    rc = kern.row_codes(m)
    assert rc is not None, kern._plan(m)
    g = torch.Generator().manual_seed(m)
    x, delta = (torch.randn(m, k, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    w = torch.rand(k, generator=g).to(DEV, torch.bfloat16) + 0.5
    y, _ = triton_add_rms_norm(x, delta, w, 1e-5)
    codes, _ = triton_add_rms_norm(x, delta, w, 1e-5, rc)
    assert torch.equal(kern.apply(codes, None), kern.apply(y, None))


# -- dynamic per-tensor activations (torchao fp8dq-per_tensor) -------------------------------------------------
@pytest.mark.parametrize("m", [1, 3, 40, 70] + ([4, 64] if DEV == "cuda" else []))
def test_dynamic_per_tensor_fp8_runs_the_static_paths_with_a_per_call_scale(m) -> None:
    """fp8 weights with one activation scale found per call (max |x| / 448) on every W8A8 path (GEMV, frag_w8,
    the swapped kernel, cuBLASLt): bit-equal to the static-scale kernel given that scale, for x and for 4x
    (a new scale each call); natively also vs the reference kernel's fake-quantized product (the interpreter's
    fp8 cast is not torch's). No codes are asked of the op before: a row-wise kernel cannot find a tensor amax."""
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.kernels.reference import ReferenceLinearKernel
    from quantrt.quant.quantize import quantize_fp8
    from quantrt.quant.weights import ActKind, ActScheme

    g = torch.Generator().manual_seed(m)
    w = quantize_fp8(torch.randn(256, 512, generator=g) * 0.05, "tensor", None)
    w = type(w)(w.data.to(DEV), w.scale.to(DEV), w.granularity, w.block)
    spec = LinearSpec(w, ActScheme(ActKind.DYNAMIC_TENSOR, FP8), torch.bfloat16)
    ok, why = TritonW8A8Kernel.can_implement(spec, PLATFORM)
    assert ok, why
    kern = TritonW8A8Kernel.prepare(spec, PLATFORM)
    assert kern.row_codes(m) is None
    x = (torch.randn(m, 512, generator=g) * torch.linspace(0.1, 3, 512)).to(DEV, torch.bfloat16)
    for xi in (x, 4 * x):
        s = xi.abs().amax().to(torch.float32).clamp(min=1e-12) / 448.0
        static = TritonW8A8Kernel.prepare(LinearSpec(w, ActScheme(ActKind.STATIC_TENSOR, FP8, scale=s),
                                                     torch.bfloat16), PLATFORM)
        y = kern.apply(xi, None)
        assert torch.equal(y, static.apply(xi, None)), kern._plan(m)
        if DEV == "cuda":
            ref = ReferenceLinearKernel.prepare(spec, PLATFORM).apply(xi, None)
            assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def test_block_fp8_weights_with_per_tensor_activations_are_declined_with_the_reason() -> None:
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.quantize import quantize_fp8
    from quantrt.quant.weights import ActKind, ActScheme

    w = quantize_fp8(torch.randn(256, 256), "block", (128, 128))
    ok, why = TritonW8A8Kernel.can_implement(LinearSpec(w, ActScheme(ActKind.DYNAMIC_TENSOR, FP8), torch.bfloat16),
                                             PLATFORM)
    assert not ok and "block-scaled weights with" in why and "are not supported" in why
