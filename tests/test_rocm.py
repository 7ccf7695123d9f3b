"""ROCm: e4m3fn -> e4m3fnuz conversion, the SGLANG_USE_AITER switch and its availability errors, and the aiter
kernels on the CPU emulation of aiter (EMULATED: no AMD GPU here), per op and end to end (online fp8)."""

from __future__ import annotations

import pytest
import torch

from quantrt.engine.engine import Engine
from quantrt.errors import PlatformError
from quantrt.layers.linear import QuantLinear
from quantrt.layers.norm import RMSNorm
from quantrt.platforms.rocm.aiter_adapter import RealAiterOps, aiter_requested, load_aiter
from quantrt.platforms.rocm.emulation import EmulatedAiterOps, EmulatedRocmPlatform, unshuffle_weight
from quantrt.platforms.rocm.fnuz import e4m3fn_to_fnuz, weight_to_fnuz
from quantrt.platforms.rocm.kernels import AiterFp8Kernel, AiterInt8Kernel
from quantrt.platforms.rocm.platform import RocmPlatform
from quantrt.platforms.xpu.cpu_platform import CpuPlatform
from quantrt.quant.kernel import LinearSpec, select_linear_kernel
from quantrt.quant.kernels.reference import ReferenceLinearKernel
from quantrt.quant.quantize import quantize_fp8
from quantrt.quant.weights import ActKind, ActScheme, IntWeight, ScaleGranularity

OPS = EmulatedAiterOps()
MI300 = EmulatedRocmPlatform()
BF16 = torch.bfloat16


def test_fnuz_keeps_values_doubles_scales_and_clears_negative_zero():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).view(torch.float8_e4m3fn)
    finite = codes.float().isfinite()
    data, scale = e4m3fn_to_fnuz(codes, torch.tensor(0.5))
    assert data.dtype == torch.float8_e4m3fnuz and scale.item() == 1.0
    assert torch.equal((data.float() * scale)[finite], (codes.float() * 0.5)[finite])
    assert not data.float()[finite].isnan().any()            # 0x80 (-0) would be NaN in fnuz
    w = quantize_fp8(torch.randn(32, 64), ScaleGranularity.CHANNEL)
    torch.testing.assert_close(weight_to_fnuz(w).dequantize(), w.dequantize(), rtol=0, atol=0)


def test_shuffle_weight_layout_and_inverse():
    w = torch.arange(32 * 64, dtype=torch.int32).reshape(32, 64).to(torch.int8)
    s = OPS.shuffle_weight(w)
    assert torch.equal(unshuffle_weight(s), w)
    # (16, 16) layout, 1-byte elements: the first 16 bytes are row 0's first 16 columns, then row 1's.
    assert torch.equal(s.reshape(-1)[:16], w[0, :16]) and torch.equal(s.reshape(-1)[16:32], w[1, :16])
    with pytest.raises(RuntimeError, match="shuffle needs"):
        OPS.shuffle_weight(torch.zeros(20, 64, dtype=torch.int8))


def test_aiter_switch_spellings():
    assert aiter_requested({"SGLANG_USE_AITER": "1"}) and aiter_requested({"QUANTRT_USE_AITER": "true"})
    assert not aiter_requested({"SGLANG_USE_AITER": "0"}) and not aiter_requested({})


def test_aiter_requested_but_absent_is_a_clear_error(monkeypatch):
    with pytest.raises(PlatformError, match="no `aiter` module is installed; install amd-aiter"):
        load_aiter(find_spec=lambda name: None)

    def broken(name):
        raise OSError("ROCm version file not found")

    with pytest.raises(PlatformError, match="importing aiter failed .*ROCm version file not found"):
        load_aiter(find_spec=lambda name: object(), import_module=broken)
    with pytest.raises(PlatformError, match="not AMD's aiter"):
        load_aiter(find_spec=lambda name: object(), import_module=lambda name: object())
    monkeypatch.delenv("SGLANG_USE_AITER", raising=False)
    monkeypatch.delenv("QUANTRT_USE_AITER", raising=False)
    rocm = RocmPlatform(arch="gfx942")
    assert rocm.aiter_ops() is None
    monkeypatch.setenv("SGLANG_USE_AITER", "1")
    if not _amd_aiter_installed():
        with pytest.raises(PlatformError, match="aiter"):
            rocm.aiter_ops()


def _amd_aiter_installed() -> bool:
    try:
        load_aiter()
    except PlatformError:
        return False
    return True


def test_real_adapter_forwards_only_known_ops():
    class FakeAiter:
        def gemm_a8w8(self, *a, **k):
            return "gemm"

        def shuffle_weight(self, *a, **k):
            return "shuffled"

        def fused_moe(self, *a, **k):
            return a, k

        ActivationType = QuantType = staticmethod(lambda v: f"enum{v}")

    ops = RealAiterOps(FakeAiter())
    assert ops.gemm_a8w8() == "gemm"
    with pytest.raises(AttributeError):
        ops.mla_decode_fwd  # noqa: B018
    _, kw = ops.fused_moe(1, 2, 3, 4, 5, quant_method=2, w1_scale=6)  # ints become aiter's enums
    assert kw["activation"] == "enum0" and kw["quant_type"] == "enum2" and kw["w1_scale"] == 6


@pytest.mark.parametrize("kind", ["fp8_channel", "fp8_tensor", "int8", "fp8_unshuffled"])
def test_aiter_kernels_match_the_reference(kind):
    torch.manual_seed(0)
    n = 40 if kind == "fp8_unshuffled" else 48
    w = torch.randn(n, 64) * 0.05
    if kind == "int8":
        s = w.abs().amax(1, keepdim=True) / 127
        weight = IntWeight((w / s).round().to(torch.int8), s, 8, 64)
        act, kernel = ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8), AiterInt8Kernel
    else:
        gran = ScaleGranularity.TENSOR if kind == "fp8_tensor" else ScaleGranularity.CHANNEL
        weight = quantize_fp8(w, gran)
        act, kernel = ActScheme(ActKind.DYNAMIC_TOKEN, torch.float8_e4m3fn), AiterFp8Kernel
    spec = LinearSpec(weight, act, BF16)
    assert select_linear_kernel(spec, MI300).kernel is kernel
    prepared = kernel.prepare(spec, MI300)
    assert prepared.preshuffled == (kind != "fp8_unshuffled")
    if kind.startswith("fp8"):
        assert prepared.weight.dtype == torch.float8_e4m3fnuz
    x, bias = torch.randn(5, 64).to(BF16), torch.randn(n).to(BF16)
    got = prepared.apply(x, bias).float()
    want = ReferenceLinearKernel(spec).apply(x, bias).float()
    # fnuz activations quantize on a grid with max 240 instead of 448: same precision, different codes
    tol = 0.05 if kind.startswith("fp8") else 1e-2
    assert ((got - want).abs().max() / want.abs().max()) < tol


def test_aiter_kernels_decline_without_the_switch(monkeypatch):
    monkeypatch.delenv("SGLANG_USE_AITER", raising=False)
    monkeypatch.delenv("QUANTRT_USE_AITER", raising=False)
    spec = LinearSpec(quantize_fp8(torch.randn(48, 64), ScaleGranularity.CHANNEL),
                      ActScheme(ActKind.DYNAMIC_TOKEN, torch.float8_e4m3fn), BF16)
    ok, why = AiterFp8Kernel.can_implement(spec, RocmPlatform(arch="gfx942"))
    assert not ok and "aiter is off" in why
    assert AiterFp8Kernel.can_implement(spec, CpuPlatform())[1].startswith("aiter is off")


def test_rmsnorm_emulation_matches_ours():
    x, w = torch.randn(3, 64).to(BF16), torch.rand(64)
    ours = RMSNorm(64, 1e-6)
    ours.weight.data = w
    ours.finish_loading(torch.float32)
    torch.testing.assert_close(OPS.rmsnorm2d_fwd(x.float(), w, 1e-6), ours(x.float()))
    out, res_out = torch.empty(3, 64), torch.empty(3, 64)
    OPS.rmsnorm2d_fwd_with_add(out, x.float(), x.float(), res_out, w, 1e-6)
    torch.testing.assert_close(out, ours(2 * x.float()))


def test_online_fp8_on_emulated_mi300_with_aiter(tiny_models):
    """The whole model on the emulated MI300 (aiter fp8 GEMMs on fnuz weights and fnuz per-token activations)
    is as close to the float model as the reference fp8 path is (its activations use e4m3fn's grid)."""
    src = str(tiny_models["llama"][0])
    prompt = list(range(5, 37))
    common = {"model_path": src, "dtype": "bfloat16", "max_total_tokens": 512}
    mi300 = Engine(quantization="fp8", platform=MI300, **common)
    ref = Engine(quantization="fp8", platform=CpuPlatform(), **common)
    flt = Engine(platform=CpuPlatform(), **common)
    kinds = {type(k).__name__ for m in mi300.model.modules() if isinstance(m, QuantLinear) and m.is_quantized
             for k in m.kernels}
    assert kinds == {"AiterFp8Kernel"}
    kw = {"sampling_params": {"max_new_tokens": 1, "temperature": 0}, "return_logprob": True,
          "logprob_start_len": 0}

    def logprobs(eng: Engine) -> torch.Tensor:
        got = eng.generate(input_ids=prompt, **kw)["meta_info"]["input_token_logprobs"][1:]
        return torch.tensor([lp for lp, _, _ in got])

    base = logprobs(flt)
    err_mi300, err_ref = (logprobs(mi300) - base).abs().mean(), (logprobs(ref) - base).abs().mean()
    assert err_mi300 < 2 * err_ref + 0.01, (float(err_mi300), float(err_ref))


def test_quark_int4fp8_moe_linears_run_as_online_fp8_everywhere(tiny_models):
    """The linear half of quark_int4fp8_moe is online fp8 (SGLang's Fp8LinearMethod): same tokens on CPU."""
    src = str(tiny_models["llama"][0])
    params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    quark = Engine(model_path=src, quantization="quark_int4fp8_moe", max_total_tokens=512)
    fp8 = Engine(model_path=src, quantization="fp8", max_total_tokens=512)
    assert quark.quant_method == "quark_int4fp8_moe"
    prompt = list(range(5, 21))
    assert quark.generate(input_ids=prompt, sampling_params=params)["output_ids"] == \
        fp8.generate(input_ids=prompt, sampling_params=params)["output_ids"]
    MI300.check_config(quark.server_args)  # on the ROCm allow-list


def _int4_per_channel_f64(w: torch.Tensor) -> torch.Tensor:
    """SGLang's quantize_int4_scale_columnwise, written out in float64: scale = rowmax|w| / 7."""
    w = w.double()
    s = w.abs().amax(-1, keepdim=True) / 7
    return (w / s).round().clamp(-7, 7) * s


def test_quark_int4fp8_moe_experts_are_int4_per_channel_on_the_reference_path(tiny_models):
    """The MoE half: every routed expert is int4 per output channel (within float32 rounding of the float64
    formula), the linears are fp8, and the tiny Qwen3-MoE generates on the reference path (CPU)."""
    from quantrt.quant.formats.quark_int4fp8_moe import fp8_split_scales

    src, hf = tiny_models["qwen3_moe"]
    eng = Engine(model_path=str(src), quantization="quark_int4fp8_moe", max_total_tokens=512)
    moe = eng.model.model.layers[0].mlp
    experts = hf.model.layers[0].mlp.experts
    for e in (0, 7):
        g, u, d = moe.qexperts[e]
        assert isinstance(g, IntWeight) and g.bits == 4 and g.group_size == 64 and int(g.codes.abs().max()) == 7
        gu = torch.cat([g.dequantize(torch.float64), u.dequantize(torch.float64)])
        torch.testing.assert_close(gu, _int4_per_channel_f64(experts.gate_up_proj[e].detach()), rtol=1e-5,
                                   atol=1e-7)
        torch.testing.assert_close(d.dequantize(torch.float64), _int4_per_channel_f64(experts.down_proj[e].detach()),
                                   rtol=1e-5, atol=1e-7)
        fp8_scale, rel = fp8_split_scales(d)  # the aiter split: int4 scale = rel * per-tensor fp8 scale
        torch.testing.assert_close(rel * fp8_scale, d.scale.reshape(-1))
        torch.testing.assert_close(fp8_scale, experts.down_proj[e].detach().abs().max() / 448, rtol=1e-5, atol=0)
    q = [m for m in eng.model.modules() if isinstance(m, QuantLinear) and m.is_quantized]
    assert q and all(i.kind == "FloatWeight" for m in q for i in m.weight_infos)
    out = eng.generate(input_ids=list(range(5, 37)), sampling_params={"max_new_tokens": 6, "temperature": 0})
    assert len(out["output_ids"]) == 6


# -- aiter beyond linears: RMSNorm, RoPE, top-k, fused_moe (EMULATED) --------------------------------------
def test_aiter_rope_matches_our_rotary_and_gptj_style():
    from transformers import LlamaConfig

    from quantrt.layers.rotary import RotaryEmbedding
    from quantrt.platforms.rocm.aiter_layers import AiterRotary

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0)
    ours, theirs = RotaryEmbedding(cfg, 16, 64), RotaryEmbedding(cfg, 16, 64)
    ours.to(torch.float32, torch.device("cpu"))
    theirs.to(torch.float32, torch.device("cpu"), MI300)
    assert isinstance(theirs._op, AiterRotary)
    q, k, pos = torch.randn(7, 4, 16), torch.randn(7, 2, 16), torch.tensor([0, 3, 9, 1, 40, 63, 5])
    want = ours(ours.tables(pos), q, k)
    got = theirs(theirs.tables(pos), q, k)
    torch.testing.assert_close(got[0], want[0]) and torch.testing.assert_close(got[1], want[1])
    # rotate_style 1 (GPT-J) rotates adjacent pairs: the same as NEOX on de-interleaved dims
    x, y = q[None].clone(), k[None].clone()
    cos, sin = ours.cos[:, :8].reshape(64, 1, 1, 8), ours.sin[:, :8].reshape(64, 1, 1, 8)
    OPS.rope_cached_positions_2c_fwd_inplace(x, y, cos, sin, pos[None], 1, True, False)
    perm = torch.cat([torch.arange(0, 16, 2), torch.arange(1, 16, 2)])
    neox = ours(ours.tables(pos), q[..., perm], k[..., perm])[0]
    torch.testing.assert_close(x[0][..., perm], neox)


@pytest.mark.parametrize("case", ["softmax", "softmax_norenorm", "v3_biased", "v2_grouped", "sigmoid_plain"])
def test_aiter_topk_matches_select_experts(case):
    from quantrt.layers.moe.routing import RoutingConfig, select_experts

    torch.manual_seed(3)
    cfg = {"softmax": RoutingConfig(16, 4), "softmax_norenorm": RoutingConfig(16, 4, renormalize=False),
           "v3_biased": RoutingConfig(16, 4, "sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5),
           "v2_grouped": RoutingConfig(16, 3, n_group=4, topk_group=2, renormalize=False,
                                       routed_scaling_factor=1.5),
           "sigmoid_plain": RoutingConfig(16, 2, "sigmoid")}[case]
    logits = torch.randn(33, 16)
    bias = torch.randn(16) * 0.1 if case == "v3_biased" else None
    w, ids = select_experts(logits, cfg, bias)
    w2, ids2 = select_experts(logits, cfg, bias, MI300.topk_op())
    assert ids2.dtype == torch.int64
    assert torch.equal(ids2.sort(-1).values, ids.sort(-1).values)
    torch.testing.assert_close(w2.gather(1, ids2.argsort(-1)), w.gather(1, ids.argsort(-1)))


def _moe_spec(kind: str, e: int, h: int, i: int, dtype=torch.bfloat16):
    from quantrt.quant.formats.quark_int4fp8_moe import quantize_int4_per_channel
    from quantrt.quant.moe_kernel import MoESpec
    from quantrt.quant.weights import WEIGHT_ONLY, DenseWeight

    torch.manual_seed(0)
    experts, acts = [], []
    fp8_act = ActScheme(ActKind.DYNAMIC_TOKEN, torch.float8_e4m3fn)
    for _ in range(e):
        ws = [torch.randn(i, h) * 0.1, torch.randn(i, h) * 0.1, torch.randn(h, i) * 0.1]
        if kind == "dense":
            experts.append(tuple(DenseWeight(w.to(dtype)) for w in ws))
            acts.append((WEIGHT_ONLY,) * 3)
        elif kind == "fp8":
            experts.append(tuple(quantize_fp8(w, ScaleGranularity.CHANNEL) for w in ws))
            acts.append((fp8_act,) * 3)
        else:
            experts.append(tuple(quantize_int4_per_channel(w) for w in ws))
            acts.append((fp8_act,) * 3)
    return MoESpec(tuple(experts), tuple(acts), h, i, dtype)


@pytest.mark.parametrize("kind,h,i", [("dense", 64, 32), ("fp8", 64, 32), ("int4", 256, 256)])
def test_aiter_fused_moe_matches_the_reference_moe(kind, h, i):
    """Shuffled (and, for int4, int32-packed) experts through the emulated aiter.fused_moe equal the reference
    MoE kernel (fnuz per-token activations on MI300 vs e4m3fn in the reference: a few e-2 relative)."""
    from quantrt.layers.moe.experts import ReferenceMoEKernel
    from quantrt.layers.moe.routing import RoutingConfig, select_experts
    from quantrt.platforms.rocm.aiter_moe import AiterFusedMoEKernel
    from quantrt.quant.moe_kernel import select_moe_kernel

    spec = _moe_spec(kind, 8, h, i)
    choice = select_moe_kernel(spec, MI300)
    assert choice.kernel is AiterFusedMoEKernel
    kern = AiterFusedMoEKernel.prepare(spec, MI300)
    assert kern.w1.shape == ((8, 2 * i, h // 8) if kind == "int4" else (8, 2 * i, h))
    assert kern.w1.dtype == {"dense": torch.bfloat16, "fp8": torch.float8_e4m3fnuz, "int4": torch.int32}[kind]
    x = torch.randn(11, h).to(torch.bfloat16)
    w, ids = select_experts(torch.randn(11, 8), RoutingConfig(8, 2))
    got = kern.apply(x, w, ids).float()
    want = ReferenceMoEKernel.prepare(spec, CpuPlatform()).apply(x, w, ids).float()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (0.01 if kind == "dense" else 0.08), rel   # independent fp8 roundings: ~5% RMS
    if kind == "int4":  # with e4m3fn activations (gfx950's fp8) the int4 path is the reference's math exactly
        kern.ops = EmulatedAiterOps(torch.float8_e4m3fn)
        exact = kern.apply(x, w, ids).float()
        assert ((exact - want).norm() / want.norm()).item() < 2e-3
    assert not AiterFusedMoEKernel.can_implement(spec, CpuPlatform())[0]


def test_aiter_fused_moe_declines_with_reasons():
    from quantrt.platforms.rocm.aiter_moe import AiterFusedMoEKernel

    ok, why = AiterFusedMoEKernel.can_implement(_moe_spec("int4", 2, 64, 32), MI300)
    assert not ok and "do not tile the (16, 16) weight shuffle" in why
    ok, why = AiterFusedMoEKernel.can_implement(_moe_spec("dense", 2, 64, 32, torch.float32), MI300)
    assert not ok and "float16/bfloat16" in why


def test_aiter_layer_ops_follow_the_switch(monkeypatch):
    monkeypatch.delenv("SGLANG_USE_AITER", raising=False)
    monkeypatch.delenv("QUANTRT_USE_AITER", raising=False)
    plat = RocmPlatform(arch="gfx942")
    assert plat.rms_norm_op() is None and plat.rotary_op() is None and plat.topk_op() is None
    monkeypatch.setenv("SGLANG_USE_AITER", "1")
    with pytest.raises(PlatformError, match="no `aiter` module is installed"):
        plat.rms_norm_op()


def test_qwen3_moe_on_emulated_mi300_runs_norm_rope_topk_moe_through_aiter(tiny_models):
    """Every RMSNorm, the rotary, the routing and the MoE experts run the (emulated) aiter ops, and the
    model's prompt log-probs stay close to the CPU reference path in bf16."""
    from quantrt.platforms.rocm.aiter_layers import AiterRmsNorm, AiterRotary, AiterTopK

    src = str(tiny_models["qwen3_moe"][0])
    common = {"model_path": src, "dtype": "bfloat16", "max_total_tokens": 512}
    mi300, cpu = Engine(platform=MI300, **common), Engine(platform=CpuPlatform(), **common)
    norms = [m for m in mi300.model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(isinstance(m._op, AiterRmsNorm) for m in norms)
    assert isinstance(mi300.model.model.rotaries[0]._op, AiterRotary)
    moe = mi300.model.model.layers[0].mlp
    assert moe.impl == "aiter_fused_moe" and isinstance(moe.topk_op, AiterTopK)
    prompt = list(range(5, 37))
    kw = {"sampling_params": {"max_new_tokens": 1, "temperature": 0}, "return_logprob": True,
          "logprob_start_len": 0}

    def logprobs(eng: Engine) -> torch.Tensor:
        return torch.tensor([lp for lp, _, _ in eng.generate(input_ids=prompt, **kw)["meta_info"]
                             ["input_token_logprobs"][1:]])

    err = (logprobs(mi300) - logprobs(cpu)).abs()
    assert err.mean() < 0.05 and err.max() < 0.3, (float(err.mean()), float(err.max()))


def test_aiter_block_fp8_linear_matches_the_reference_and_the_formula():
    """128x128 block fp8 weights with per-1x128 fp8 activations through pertoken_quant over 128-wide groups +
    gemm_a8w8_blockscale (emulated), vs the reference kernel; and the emulated GEMM vs a float64 loop over
    K-blocks written from its documented semantics."""
    from quantrt.platforms.rocm.aiter_kernels import AiterBlockFp8Kernel

    torch.manual_seed(0)
    w = torch.randn(200, 256) * 0.05                                       # N=200: a partial last N-block
    weight = quantize_fp8(w, ScaleGranularity.BLOCK, block=(128, 128))
    act = ActScheme(ActKind.DYNAMIC_GROUP, torch.float8_e4m3fn, group=128)
    spec = LinearSpec(weight, act, BF16)
    assert select_linear_kernel(spec, MI300).kernel is AiterBlockFp8Kernel
    k = AiterBlockFp8Kernel.prepare(spec, MI300)
    assert k.weight.dtype == torch.float8_e4m3fnuz and torch.equal(k.w_scale, weight.scale * 2)
    x, bias = torch.randn(6, 256).to(BF16), torch.randn(200).to(BF16)
    got = k.apply(x, bias).float()
    want = ReferenceLinearKernel(spec).apply(x, bias).float()
    assert ((got - want).abs().max() / want.abs().max()) < 0.05
    xq, xs = OPS.pertoken_quant(x.float().reshape(-1, 128), torch.float8_e4m3fn)
    xq, xs = xq.reshape(6, 256), xs.reshape(6, 2)
    f64 = torch.zeros(6, 200, dtype=torch.float64)
    for b in range(2):
        sl = slice(b * 128, (b + 1) * 128)
        part = xq[:, sl].double() @ weight.data[:, sl].double().T                          # [M, N]
        f64 += part * xs[:, b:b + 1].double() * weight.scale[:, b].double().repeat_interleave(128)[:200]
    y = OPS.gemm_a8w8_blockscale(xq, weight.data, xs, weight.scale, dtype=BF16)
    torch.testing.assert_close(y.double(), f64.to(BF16).double(), rtol=1e-2, atol=1e-2)
    ok, why = AiterBlockFp8Kernel.can_implement(LinearSpec(weight, ActScheme(ActKind.DYNAMIC_TOKEN,
                                                                             torch.float8_e4m3fn), BF16), MI300)
    assert not ok and "per-token-group of 128" in why


@pytest.fixture(scope="module")
def moe256(tmp_path_factory, tokenizer_dir):
    """A tiny Qwen3-MoE whose hidden and expert sizes (256) tile aiter's int4 weight shuffle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    d = tmp_path_factory.mktemp("moe256")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=256, norm_topk_prob=True,
                         max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.05,
                         eos_token_id=2, bos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_quark_int4fp8_moe_on_emulated_mi300_runs_aiter_fused_moe(moe256):
    """quark_int4fp8_moe end to end on the emulated MI300: experts int4-in-int32 through aiter fused_moe (fp8
    upcast, fnuz per-token activations), linears aiter fp8. Its distance to the float model is comparable to
    the same method's on the CPU reference path (activations quantize on fnuz's grid there, e4m3fn's here)."""
    common = {"model_path": str(moe256), "dtype": "bfloat16", "max_total_tokens": 256}
    mi300 = Engine(platform=MI300, quantization="quark_int4fp8_moe", **common)
    cpu = Engine(platform=CpuPlatform(), quantization="quark_int4fp8_moe", **common)
    flt = Engine(platform=CpuPlatform(), **common)
    moe = mi300.model.model.layers[0].mlp
    assert moe.impl == "aiter_fused_moe" and moe.kernel.w1.dtype == torch.int32
    assert cpu.model.model.layers[0].mlp.impl != "aiter_fused_moe"
    prompt = list(range(5, 29))
    kw = {"sampling_params": {"max_new_tokens": 1, "temperature": 0}, "return_logprob": True,
          "logprob_start_len": 0}

    def lp(eng: Engine) -> torch.Tensor:
        return torch.tensor([x for x, _, _ in eng.generate(input_ids=prompt, **kw)["meta_info"]
                             ["input_token_logprobs"][1:]])

    base = lp(flt)
    err_mi300, err_cpu = (lp(mi300) - base).abs().mean(), (lp(cpu) - base).abs().mean()
    assert err_mi300 < 2 * err_cpu + 0.02, (float(err_mi300), float(err_cpu))


@pytest.mark.parametrize("kind", ["fp8_channel_dynamic", "fp8_tensor_static", "int8"])
def test_rocm_triton_w8a8_uses_fnuz_on_mi300(kind, monkeypatch):
    """Without aiter, the shared Triton W8A8 kernel serves ROCm: e4m3fn weights become e4m3fnuz (scales x2,
    static input scale x2; the weight's values are unchanged). Triton's interpreter has no fnuz type, so the
    fp8 GEMM itself only runs on AMD hardware; int8 runs here and matches the reference kernel."""
    from quantrt.platforms.rocm.kernels import RocmTritonW8A8Kernel

    monkeypatch.delenv("SGLANG_USE_AITER", raising=False)
    monkeypatch.delenv("QUANTRT_USE_AITER", raising=False)
    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.05
    if kind == "int8":
        s = w.abs().amax(1, keepdim=True) / 127
        spec = LinearSpec(IntWeight((w / s).round().to(torch.int8), s, 8, 64),
                          ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8), BF16)
    elif kind == "fp8_tensor_static":
        spec = LinearSpec(quantize_fp8(w, ScaleGranularity.TENSOR),
                          ActScheme(ActKind.STATIC_TENSOR, torch.float8_e4m3fn, scale=torch.tensor(3.0 / 448)), BF16)
    else:
        spec = LinearSpec(quantize_fp8(w, ScaleGranularity.CHANNEL),
                          ActScheme(ActKind.DYNAMIC_TOKEN, torch.float8_e4m3fn), BF16)
    gfx942 = RocmPlatform(arch="gfx942")
    monkeypatch.setattr(gfx942, "device", lambda index=0: torch.device("cpu"))
    assert select_linear_kernel(spec, gfx942).kernel is RocmTritonW8A8Kernel
    k = RocmTritonW8A8Kernel.prepare(spec, gfx942)
    if kind == "int8":
        assert k.data.dtype == torch.int8
        x = (torch.randn(5, 64) * 0.8).to(BF16)
        got, want = k.apply(x, None).float(), ReferenceLinearKernel(spec).apply(x, None).float()
        assert ((got - want).abs().max() / want.abs().max()) < 1e-2
        return
    assert k.data.dtype == torch.float8_e4m3fnuz and k.qmax == 240.0
    scale = k.w_scale.reshape(-1, 1) if k.w_scale.numel() > 1 else k.w_scale.reshape(())
    torch.testing.assert_close(k.data.float() * scale, spec.weight.dequantize(), rtol=0, atol=0)
    if kind == "fp8_tensor_static":
        assert float(k.act_scale) == pytest.approx(2 * 3.0 / 448)


def test_rocm_triton_wna16_never_takes_the_ptx_path():
    from quantrt.platforms.rocm.kernels import RocmTritonWNA16Kernel

    torch.manual_seed(0)
    wt = IntWeight(torch.randint(-8, 8, (64, 256), dtype=torch.int8), torch.rand(64, 2) * 0.02 + 1e-3, 4, 128)
    spec = LinearSpec(wt, ActScheme(), BF16)
    k = RocmTritonWNA16Kernel.prepare(spec, MI300)
    assert not k._tc_ok(8, 256)   # the CUDA kernel would use its inline-PTX tensor-core path here
    x = torch.randn(8, 256).to(BF16)
    got, want = k.apply(x, None).float(), ReferenceLinearKernel(spec).apply(x, None).float()
    assert ((got - want).abs().max() / want.abs().max()) < 1e-2
