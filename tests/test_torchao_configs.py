"""--torchao-config: the nine strings as canonical weights + our kernels, end to end through the Engine."""

from __future__ import annotations

import pytest
import torch

from quantrt.engine.engine import Engine
from quantrt.errors import ConfigError
from quantrt.layers.linear import QuantLinear
from quantrt.quant.detect import detect_for_args
from quantrt.quant.formats.torchao import TorchaoFormat, parse_torchao_config, quantize_int4_torchao
from quantrt.quant.weights import ActKind, FloatWeight, IntWeight, ScaleGranularity
from quantrt.server_args import ServerArgs
from tests.test_fp8_engine import _hf_weight, sqnr_db
from tests.test_w8a8 import _kl_vs_float

# string -> (weight type, activation kind, minimum per-layer output SQNR dB, max KL vs float)
CASES = {
    "int8wo": (IntWeight, ActKind.NONE, 38.0, 0.005),
    "int8dq": (IntWeight, ActKind.DYNAMIC_TOKEN, 30.0, 0.01),
    "fp8wo": (FloatWeight, ActKind.NONE, 28.0, 0.01),
    "fp8dq-per_tensor": (FloatWeight, ActKind.DYNAMIC_TENSOR, 22.0, 0.02),
    "fp8dq-per_row": (FloatWeight, ActKind.DYNAMIC_TOKEN, 25.0, 0.01),
    "int4wo-32": (IntWeight, ActKind.NONE, 16.0, 0.1),
}


@pytest.mark.parametrize("config", sorted(CASES))
def test_torchao_config_end_to_end(tiny_models, config):
    wtype, akind, min_db, max_kl = CASES[config]
    path, hf = tiny_models["llama"]
    eng = Engine(model_path=str(path), torchao_config=config, max_total_tokens=2048)
    assert eng.quant_method == "torchao"
    torch.manual_seed(0)
    for layer in (m for m in eng.model.modules() if isinstance(m, QuantLinear)):
        if layer.shards[0][0] == "lm_head":
            assert not layer.is_quantized  # SGLang's filter: only names containing "proj"
            continue
        x = torch.randn(8, layer.in_features)
        assert sqnr_db(x.double() @ _hf_weight(hf, layer).double().T, layer(x)) >= min_db, layer.kernel_desc
        assert "reference" not in layer.kernel_desc, layer.kernel_desc
    fmt = eng.quant_format
    assert fmt.act_scheme("model.layers.0.mlp.down_proj").kind is akind
    assert isinstance(fmt.make_weight("p", {"weight": torch.randn(8, 64)}, (8, 64)), wtype)
    assert _kl_vs_float(eng, hf) < max_kl


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4wo_follows_torchao_float_zero_convention(group):
    torch.manual_seed(0)
    w = torch.randn(16, 512)
    q = quantize_int4_torchao(w, group)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15 and q.scale.shape == (16, 512 // group)
    zero = q.offset + 8 * q.scale                                        # torchao's zero point (float domain)
    assert torch.equal(zero.to(torch.bfloat16).float(), zero)            # bf16 scales_precision
    deq = (q.codes.float() - 8).reshape(16, -1, group) * q.scale[..., None] + zero[..., None]
    torch.testing.assert_close(q.dequantize(), deq.reshape(16, 512), rtol=0, atol=1e-5)
    assert (q.dequantize() - w).abs().max() <= 0.6 * q.scale.max()      # round-to-nearest within a step


def test_parse_errors_and_mapping():
    assert parse_torchao_config("int4wo-128") == ("int4wo", 128)
    assert parse_torchao_config("fp8dq-per_row") == ("fp8dq-per_row", 0)
    with pytest.raises(ConfigError, match="group size must be one of 32, 64, 128, 256"):
        parse_torchao_config("int4wo-48")
    with pytest.raises(ConfigError, match="not a torchao config; choose one of: int8wo"):
        parse_torchao_config("int2wo")
    fmt = TorchaoFormat("fp8dq-per_tensor")
    fw = fmt.make_weight("p", {"weight": torch.randn(8, 64)}, (8, 64))
    assert fw.granularity is ScaleGranularity.TENSOR
    assert not fmt.is_quantized("lm_head") and fmt.is_quantized("model.layers.0.self_attn.q_proj")


def test_torchao_on_a_quantized_checkpoint_is_refused():
    args = ServerArgs(model_path="m", torchao_config="int8wo")
    hf = {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
    with pytest.raises(ConfigError, match=r"--torchao-config int8wo quantizes a float checkpoint at load time, "
                                          r"but m is already quantized with fp8 \(config.json quantization_config\)"):
        detect_for_args("m", hf, args)
    with pytest.raises(ConfigError, match="GGUF file"):
        detect_for_args("m.gguf", {}, ServerArgs(model_path="m.gguf", torchao_config="int8dq"))
    assert detect_for_args("m", {}, args) == ("torchao", {"torchao_config": "int8wo"})


def test_int4wo_skips_layers_whose_k_is_not_a_multiple_of_the_group():
    from quantrt.quant.weights import DenseWeight

    fmt = TorchaoFormat("int4wo-256")
    assert isinstance(fmt.make_weight("p", {"weight": torch.randn(8, 64)}, (8, 64)), DenseWeight)
    assert isinstance(fmt.make_weight("p", {"weight": torch.randn(8, 256)}, (8, 256)), IntWeight)
