"""fp8: quantizers, Fp8Format on real on-disk tensor layouts, fused shards, CPU kernel vs reference."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantrt.errors import CheckpointError, ConfigError
from quantrt.platform.interface import Platform
from quantrt.platforms.xpu.cpu_kernels import CpuFp8EmulatedKernel
from quantrt.quant.format import get_format
from quantrt.quant.kernel import LinearSpec
from quantrt.quant.kernels.reference import ReferenceLinearKernel
from quantrt.quant.merge import concat_n, merge_act_schemes
from quantrt.quant.quantize import (
    fake_quantize_act,
    quantize_act_per_token,
    quantize_act_per_token_group,
    quantize_fp8,
)
from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, ScaleGranularity

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
Fp8 = get_format("fp8")
P = "model.layers.0.self_attn"


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


# ---- quantizers ------------------------------------------------------------------------------
def test_quantize_fp8_granularities_and_zero_rows() -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 200)
    w[3] = 0
    for g, block in (("tensor", None), ("channel", None), ("block", (64, 128))):
        q = quantize_fp8(w, g, block)
        assert q.data.dtype == E4 and torch.isfinite(q.dequantize()).all()
        assert sqnr_db(w, q.dequantize()) >= 25
        assert q.dequantize()[3].abs().max() == 0
    c = quantize_fp8(w, "channel")
    assert c.scale[0].item() == pytest.approx(w[0].abs().max().item() / 448, rel=1e-6)
    e5 = quantize_fp8(w, "channel", dtype=E5)
    assert e5.data.dtype == E5 and e5.data.float().abs().max().item() == 57344


def test_fp8_online_per_channel_sqnr() -> None:
    torch.manual_seed(1)
    for n, k in ((576, 576), (1536, 576), (64, 1536)):
        w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
        q = Fp8.from_config({}).make_weight(f"{P}.q_proj", {"weight": w}, (n, k))
        assert q.granularity is ScaleGranularity.CHANNEL
        assert sqnr_db(w.float(), q.dequantize()) >= 25


def test_activation_quantizers() -> None:
    x = torch.randn(5, 300) * 3
    x[2] = 0
    q, s = quantize_act_per_token(x, E4)
    assert s.shape == (5, 1) and q.float().abs().amax(1)[0] == 448
    assert (q[2].float() == 0).all()
    qg, sg = quantize_act_per_token_group(x, E4, 128)
    assert sg.shape == (5, 3) and qg.shape == x.shape
    assert sqnr_db(x, fake_quantize_act(x, ActScheme(ActKind.DYNAMIC_GROUP, E4, group=128))) >= 25
    st = fake_quantize_act(x, ActScheme(ActKind.STATIC_TENSOR, E4, scale=torch.tensor(0.001)))
    assert st.abs().max().item() == pytest.approx(0.448)  # clamped to 448 * scale


# ---- Fp8Format on checkpoint tensors -----------------------------------------------------------
def _write_and_read(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return load_file(str(tmp_path / "model.safetensors"))


def _shard(sd: dict[str, torch.Tensor], prefix: str, fmt) -> dict[str, torch.Tensor]:
    req, opt = fmt.tensor_names(prefix)
    got = {k.removeprefix(prefix + "."): v for k, v in sd.items() if k.startswith(prefix + ".")}
    assert req <= got.keys() <= req | opt
    return got


@pytest.mark.parametrize("scheme", ["static", "dynamic"])
def test_per_tensor_checkpoint(tmp_path: Path, scheme: str) -> None:
    torch.manual_seed(2)
    w = torch.randn(64, 32)
    q = quantize_fp8(w, "tensor")
    sd = {f"{P}.q_proj.weight": q.data, f"{P}.q_proj.weight_scale": q.scale.reshape(1)}
    if scheme == "static":
        sd[f"{P}.q_proj.input_scale"] = torch.tensor(0.02)
    sd = _write_and_read(tmp_path, sd)
    fmt = Fp8.from_config({"quant_method": "fp8", "activation_scheme": scheme})
    fw = fmt.make_weight(f"{P}.q_proj", _shard(sd, f"{P}.q_proj", fmt), (64, 32))
    assert fw.granularity is ScaleGranularity.TENSOR and torch.equal(fw.dequantize(), q.dequantize())
    act = fmt.act_scheme(f"{P}.q_proj")
    if scheme == "static":
        assert act.kind is ActKind.STATIC_TENSOR and act.scale.item() == pytest.approx(0.02)
    else:
        assert act.kind is ActKind.DYNAMIC_TOKEN and act.dtype == E4


def test_block_checkpoint_with_partial_blocks_and_ue8m0(tmp_path: Path) -> None:
    torch.manual_seed(3)
    w = torch.randn(200, 300)
    q = quantize_fp8(w, "block", (128, 128))
    scale = torch.exp2(torch.ceil(torch.log2(q.scale)))  # ue8m0: powers of two
    sd = _write_and_read(tmp_path, {f"{P}.o_proj.weight": q.data, f"{P}.o_proj.weight_scale_inv": scale})
    fmt = Fp8.from_config({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                           "weight_block_size": [128, 128], "scale_fmt": "ue8m0"})
    fw = fmt.make_weight(f"{P}.o_proj", _shard(sd, f"{P}.o_proj", fmt), (200, 300))
    assert fw.scale.shape == (2, 3) and fw.block == (128, 128)
    act = fmt.act_scheme(f"{P}.o_proj")
    assert act.kind is ActKind.DYNAMIC_GROUP and act.group == 128
    bad = dict(_shard(sd, f"{P}.o_proj", fmt), weight_scale_inv=scale * 1.5)
    with pytest.raises(CheckpointError, match="o_proj.weight_scale_inv: scale_fmt is ue8m0"):
        fmt.make_weight(f"{P}.o_proj", bad, (200, 300))


def test_e5m2_checkpoint_weight() -> None:
    q = quantize_fp8(torch.randn(16, 32), "tensor", dtype=E5)
    fmt = Fp8.from_config({"quant_method": "fp8", "activation_scheme": "dynamic"})
    fw = fmt.make_weight("m.up_proj", {"weight": q.data, "weight_scale": q.scale}, (16, 32))
    assert fw.data.dtype == E5 and torch.equal(fw.dequantize(), q.dequantize())


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="activation_scheme 'static' or 'dynamic', got None"):
        Fp8.from_config({"quant_method": "fp8"})
    with pytest.raises(ConfigError, match="requires activation_scheme 'dynamic', got 'static'"):
        Fp8.from_config({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]})
    with pytest.raises(ConfigError, match="weight_block_size must be two positive ints"):
        Fp8.from_config({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128]})


def test_bad_tensors_name_the_tensor() -> None:
    fmt = Fp8.from_config({"quant_method": "fp8", "activation_scheme": "static"})
    good = {"weight": torch.zeros(4, 8, dtype=E4), "weight_scale": torch.tensor(1.0),
            "input_scale": torch.tensor(1.0)}
    cases = [
        ({"weight": torch.zeros(4, 8, dtype=torch.bfloat16)}, "x.q_proj.weight has dtype torch.bfloat16"),
        ({"weight": torch.zeros(4, 9, dtype=E4)}, r"x.q_proj.weight has shape \(4, 9\)"),
        ({"weight_scale": torch.ones(4)}, r"x.q_proj.weight_scale has shape \(4,\), expected \[\]"),
        ({"weight_scale": torch.tensor(float("nan"))}, "x.q_proj.weight_scale contains NaN"),
        ({"weight_scale": torch.tensor(-1.0)}, "x.q_proj.weight_scale contains negative"),
        ({"weight_scale": torch.tensor(1, dtype=torch.int32)}, "x.q_proj.weight_scale has dtype torch.int32"),
        ({"input_scale": torch.tensor(float("inf"))}, "x.q_proj.input_scale contains NaN or inf"),
        ({"input_scale": torch.tensor(0.0)}, "x.q_proj.input_scale is 0"),
    ]
    for patch, msg in cases:
        with pytest.raises(CheckpointError, match=msg):
            fmt.make_weight("x.q_proj", {**good, **patch}, (4, 8))
    online = Fp8.from_config({})
    with pytest.raises(CheckpointError, match="online fp8 quantizes float32/bfloat16/float16"):
        online.make_weight("x.q_proj", {"weight": torch.zeros(4, 8, dtype=E4)}, (4, 8))


def test_ignored_layers_and_lm_head() -> None:
    fmt = Fp8.from_config({"quant_method": "fp8", "activation_scheme": "dynamic",
                           "ignored_layers": ["layers.1.self_attn.qkv_proj"],
                           "modules_to_not_convert": ["mlp.down_proj"]})
    assert fmt.is_quantized("model.layers.0.self_attn.q_proj")
    assert not fmt.is_quantized("model.layers.1.self_attn.k_proj")  # fused name listed
    assert not fmt.is_quantized("model.layers.3.mlp.down_proj")
    assert fmt.is_quantized("model.layers.3.mlp.up_proj")
    assert not fmt.is_quantized("lm_head") and not Fp8.from_config({}).is_quantized("lm_head")
    assert fmt.tensor_names("model.layers.0.mlp.up_proj") == (frozenset({"weight", "weight_scale"}),
                                                              frozenset({"input_scale"}))


def test_fused_shards_with_differing_scales_merge_exactly() -> None:
    torch.manual_seed(4)
    fmt = Fp8.from_config({"quant_method": "fp8", "activation_scheme": "static"})
    ws, acts = [], []
    for name, n, xs in (("q_proj", 64, 0.01), ("k_proj", 16, 0.03), ("v_proj", 16, 0.02)):
        q = quantize_fp8(torch.randn(n, 32) * n, "tensor")
        ws.append(fmt.make_weight(f"{P}.{name}", {"weight": q.data, "weight_scale": q.scale,
                                                  "input_scale": torch.tensor([xs])}, (n, 32)))
        acts.append(fmt.act_scheme(f"{P}.{name}"))
    merged = concat_n(ws)
    assert merged.granularity is ScaleGranularity.CHANNEL
    assert torch.equal(merged.dequantize(), torch.cat([w.dequantize() for w in ws]))
    assert merge_act_schemes(acts).scale.item() == pytest.approx(0.03)


# ---- CPU kernel vs reference ------------------------------------------------------------------
def _cases() -> list[tuple[str, FloatWeight, ActScheme]]:
    torch.manual_seed(5)
    w = torch.randn(192, 320) * 0.05
    return [
        ("tensor/static", quantize_fp8(w, "tensor"), ActScheme(ActKind.STATIC_TENSOR, E4, scale=torch.tensor(0.01))),
        ("tensor/token", quantize_fp8(w, "tensor"), ActScheme(ActKind.DYNAMIC_TOKEN, E4)),
        ("channel/token", quantize_fp8(w, "channel"), ActScheme(ActKind.DYNAMIC_TOKEN, E4)),
        ("e5m2/token", quantize_fp8(w, "channel", dtype=E5), ActScheme(ActKind.DYNAMIC_TOKEN, E4)),
        ("block/group", quantize_fp8(w, "block", (128, 128)), ActScheme(ActKind.DYNAMIC_GROUP, E4, group=128)),
        ("channel/a16", quantize_fp8(w, "channel"), ActScheme()),
    ]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_matches_reference(case: int, dtype: torch.dtype) -> None:
    name, fw, act = _cases()[case]
    spec = LinearSpec(fw, act, dtype)
    plat = Platform()
    assert CpuFp8EmulatedKernel.can_implement(spec, plat) == (True, "")
    fast, ref = CpuFp8EmulatedKernel.prepare(spec, plat), ReferenceLinearKernel.prepare(spec, plat)
    x = (torch.randn(2, 7, 320) * 2).to(dtype)
    bias = torch.randn(192).to(dtype)
    y, y_ref = fast.apply(x, bias), ref.apply(x, bias)
    assert y.shape == (2, 7, 192) and y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=name)
    else:  # same fp32 math, then one rounding to bf16: at most 1 ulp apart
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=8e-3, atol=1e-5, msg=name)
    # and both are close to the float matmul (quantization error only)
    exact = torch.nn.functional.linear(x.float(), fw.dequantize(), bias.float())
    assert sqnr_db(exact, y.float()) >= 20


def test_quant_linear_end_to_end_online_and_static() -> None:
    from quantrt.layers.linear import QuantLinear
    from quantrt.platforms.xpu.cpu_kernels import CPU_LINEAR_KERNELS

    class CpuLike(Platform):
        def linear_kernels(self):  # type: ignore[no-untyped-def]
            return list(CPU_LINEAR_KERNELS)

    torch.manual_seed(6)
    shards = [("q_proj", 64), ("k_proj", 16), ("v_proj", 16)]
    ws = [torch.randn(n, 32) * 0.1 for _, n in shards]
    x = torch.randn(3, 32)
    lin = QuantLinear(P, shards, 32)
    lin.load([{"weight": w.bfloat16()} for w in ws], Fp8.from_config({}), CpuLike(), torch.float32)
    assert lin.kernel_desc.startswith("cpu_fp8_emulated") and len(lin.kernels) == 1
    assert sqnr_db(x @ torch.cat(ws).bfloat16().float().t(), lin(x)) >= 25
    # static per-tensor with equal input scales merges into one kernel
    fmt = Fp8.from_config({"quant_method": "fp8", "activation_scheme": "static"})
    qs = [quantize_fp8(w, "tensor") for w in ws]
    tensors = [{"weight": q.data, "weight_scale": q.scale, "input_scale": torch.tensor(0.01)} for q in qs]
    lin = QuantLinear(P, shards, 32)
    lin.load(tensors, fmt, CpuLike(), torch.float32)
    assert len(lin.kernels) == 1 and lin.weight_infos[0].granularity is ScaleGranularity.CHANNEL
