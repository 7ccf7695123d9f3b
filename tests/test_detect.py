"""detect_quantization: sources, CLI reconciliation (FORMATS.md §1.3) and every error message."""

import pytest

from quantrt.errors import ConfigError, NotSupportedYet
from quantrt.quant.detect import build_format, detect_quantization
from quantrt.quant.formats.fp8 import Fp8Format

FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}


@pytest.mark.parametrize(("path", "hf", "cli", "want"), [
    ("m", {}, None, None),
    ("m", {}, "fp8", "fp8"),                                              # online
    ("m.gguf", {}, None, "gguf"),
    ("m.gguf", {}, "gguf", "gguf"),
    ("m", {"quantization_config": FP8}, None, "fp8"),
    ("m", {"quantization_config": FP8}, "fp8", "fp8"),
    ("m", {"quantization_config": {"quant_method": "AWQ", "bits": 4}}, None, "awq"),
    ("m", {"text_config": {"quantization_config": FP8}}, None, "fp8"),
    ("m", {"compression_config": {"format": "int-quantized"}}, None, "compressed-tensors"),
    ("m", {"quantization_config": {"quant_method": "compressed-tensors"}}, "w8a8_int8", "w8a8_int8"),
    ("m", {"quantization_config": {"quant_method": "compressed-tensors"}}, "w8a8_fp8", "w8a8_fp8"),
    ("m", {"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}}, "modelopt_fp8",
     "modelopt_fp8"),
    ("m", {"quantization_config": {"quant_method": "modelopt"}}, "petit_nvfp4", "petit_nvfp4"),
    ("m", {"quantization_config": {"quant_algo": "NVFP4"}}, None, "modelopt_fp4"),       # flat ModelOpt
    ("m", {"quantization_config": {"quant_algo": "MIXED_PRECISION"}}, None, "w4afp8"),
    ("m", {"quantization_config": {"quant_method": "modelopt_fp8"}}, "modelopt", "modelopt_fp8"),
])
def test_detection_table(path: str, hf: dict, cli: str | None, want: str | None) -> None:
    method, qcfg = detect_quantization(path, hf, cli)
    assert method == want
    if want in (None, "gguf") or (want == "fp8" and not hf):
        assert qcfg == {}


def test_quantization_config_wins_over_compression_config() -> None:
    hf = {"quantization_config": FP8, "compression_config": {"quant_method": "compressed-tensors"}}
    assert detect_quantization("m", hf, None) == ("fp8", FP8)


def test_mismatch_uses_sglang_wording() -> None:
    with pytest.raises(ConfigError, match=r"^Quantization method specified in the model config \(gptq\) does "
                                          r"not match the quantization method specified in the `quantization` "
                                          r"argument \(awq\)\.$"):
        detect_quantization("m", {"quantization_config": {"quant_method": "gptq"}}, "awq")
    with pytest.raises(ConfigError, match=r"model config \(gguf\).*argument \(awq\)"):
        detect_quantization("m.gguf", {}, "awq")


def test_online_method_on_quantized_checkpoint_refused() -> None:
    with pytest.raises(ConfigError, match=r"model config \(awq\).*argument \(fp8\).*already quantized with "
                                          r"awq \(config.json quantization_config\); drop --quantization"):
        detect_quantization("m", {"quantization_config": {"quant_method": "awq"}}, "fp8")


def test_other_errors() -> None:
    with pytest.raises(ConfigError, match="invalid --quantization 'int3'; choose one of: .*awq"):
        detect_quantization("m", {}, "int3")
    with pytest.raises(ConfigError, match="--quantization awq needs a checkpoint quantized with awq, but m has "
                                          "no quantization config"):
        detect_quantization("m", {}, "awq")
    with pytest.raises(ConfigError, match="config.json quantization_config in m has no quant_method"):
        detect_quantization("m", {"quantization_config": {"bits": 4}}, None)


def test_build_format() -> None:
    assert build_format(None, {}) is None
    online = build_format("fp8", {})
    assert isinstance(online, Fp8Format) and not online.serialized
    assert build_format("fp8", FP8).serialized
    with pytest.raises(NotSupportedYet, match=r"^quantization method 'qoq' is recognised but not supported yet "
                                              r"\(supported: .*fp8.*\)$"):
        build_format("qoq", {"quant_method": "qoq"})
    with pytest.raises(ConfigError, match="invalid quantization method 'nope'"):
        build_format("nope", {})
