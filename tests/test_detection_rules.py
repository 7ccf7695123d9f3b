"""FORMATS.md §1.3 detection and reconciliation: side files, precedence, allowed CLI/checkpoint pairs,
online methods on quantized checkpoints, flag-selected online methods, not-built methods."""

from __future__ import annotations

import json
from itertools import product

import pytest

from quantrt.errors import ConfigError, NotSupportedYet
from quantrt.quant.detect import (
    ALLOWED_CLI_OVERRIDES,
    ONLINE_METHODS,
    build_format,
    built_methods,
    detect_for_args,
    detect_quantization,
)
from quantrt.quant.formats.compressed_tensors import CompressedTensorsFormat
from quantrt.quant.formats.w8a8 import W8A8Fp8Format, W8A8Int8Format
from quantrt.server_args import ServerArgs

FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}
CT = {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"g": {
    "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
    "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}}, "ignore": ["lm_head"]}


@pytest.mark.parametrize(("algo", "want"), [("FP8", "modelopt_fp8"), ("NVFP4", "modelopt_fp4"),
                                            ("W4A8_NVFP4_FP8", "modelopt_fp4"), ("MIXED_PRECISION", "w4afp8")])
def test_hf_quant_config_json(tmp_path, algo, want):
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"},
                                                               "quantization": {"quant_algo": algo}}))
    method, qcfg = detect_quantization(str(tmp_path), {}, None)
    assert method == want and qcfg["quant_method"] == want
    # config.json's own quantization_config comes first
    assert detect_quantization(str(tmp_path), {"quantization_config": FP8}, None)[0] == "fp8"


def test_hf_quant_config_json_errors(tmp_path):
    (tmp_path / "hf_quant_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="hf_quant_config.json is not valid JSON"):
        detect_quantization(str(tmp_path), {}, None)
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "INT3"}}))
    with pytest.raises(ConfigError, match="quant_algo 'INT3' is not a ModelOpt algorithm"):
        detect_quantization(str(tmp_path), {}, None)


def test_modelslim_description_takes_precedence(tmp_path):
    (tmp_path / "quant_model_description.json").write_text(json.dumps({"model.layers.0.mlp.down_proj.weight": "W8A8"}))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    method, qcfg = detect_quantization(str(tmp_path), {"quantization_config": FP8}, None)
    assert method == "modelslim" and qcfg["model.layers.0.mlp.down_proj.weight"] == "W8A8"


CKPT_METHODS = ["fp8", "awq", "gptq", "compressed-tensors", "modelopt", "bitsandbytes", "quark"]
CLI_METHODS = ["fp8", "awq", "gptq", "w8a8_int8", "w8a8_fp8", "modelopt_fp8", "modelopt_fp4", "petit_nvfp4",
               "compressed-tensors", "bitsandbytes"]


@pytest.mark.parametrize(("cli", "ckpt"), list(product(CLI_METHODS, CKPT_METHODS)))
def test_every_cli_checkpoint_pair(cli, ckpt):
    hf = {"quantization_config": {"quant_method": ckpt, "quant_algo": "FP8"}}
    if cli == ckpt or (cli, ckpt) in ALLOWED_CLI_OVERRIDES:
        assert detect_quantization("m", hf, cli)[0] == cli
        return
    if ckpt == "modelopt" and cli in ("modelopt_fp8",):
        return  # covered by ALLOWED_CLI_OVERRIDES
    with pytest.raises(ConfigError) as e:
        detect_quantization("m", hf, cli)
    msg = str(e.value)
    assert f"model config ({ckpt})" in msg and f"argument ({cli})" in msg  # names both sides
    if cli in ONLINE_METHODS:
        assert f"already quantized with {ckpt}" in msg


@pytest.mark.parametrize("cli", ["w8a8_int8", "w8a8_fp8", "fp8"])
def test_online_methods_on_float_checkpoints(cli):
    assert detect_quantization("m", {}, cli) == (cli, {})


def test_w8a8_overrides_build_on_the_compressed_tensors_format():
    fmt = build_format("w8a8_int8", CT)
    assert isinstance(fmt, W8A8Int8Format) and isinstance(fmt.checkpoint, CompressedTensorsFormat)
    assert isinstance(build_format("w8a8_fp8", {}), W8A8Fp8Format)
    with pytest.raises(ConfigError, match="compressed-tensors checkpoints, not fp8"):
        build_format("w8a8_int8", FP8)


def test_flag_methods():
    assert detect_for_args("m", {}, ServerArgs(model_path="m", quantization_config_path="int8.yaml")) == \
        ("yaml_rules", {"path": "int8.yaml"})
    with pytest.raises(ConfigError, match="--quantization-config-path r.yaml quantizes a float checkpoint.*"
                                          "already quantized with compressed-tensors"):
        detect_for_args("m", {"quantization_config": CT}, ServerArgs(model_path="m", quantization_config_path="r.yaml"))
    with pytest.raises(ConfigError, match="--torchao-config int8wo and --quantization-config-path r.yaml both"):
        detect_for_args("m", {}, ServerArgs(model_path="m", torchao_config="int8wo", quantization_config_path="r.yaml"))
    assert detect_for_args("m", {"quantization_config": FP8}, ServerArgs(model_path="m")) == ("fp8", FP8)


def test_recognised_methods_not_built_are_refused_not_misloaded():
    built = set(built_methods())
    assert {"fp8", "w8a8_int8", "w8a8_fp8", "compressed-tensors", "torchao", "yaml_rules"} <= built
    with pytest.raises(NotSupportedYet, match="'qoq' is recognised but not supported yet"):
        build_format("qoq", {"quant_method": "qoq"})


class _FakeCuda:
    name = "cuda"

    def __init__(self, cap: int):
        from quantrt.platform.interface import DeviceCapability

        self.cap = DeviceCapability(cap // 10, cap % 10)

    def capability(self):
        return self.cap


AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}


def test_awq_and_gptq_marlin_overrides():
    from quantrt.quant.detect import _awq_marlin_override, _gptq_marlin_override

    h100, t4 = _FakeCuda(90), _FakeCuda(75)
    assert _awq_marlin_override("awq", AWQ, None, h100) == "awq_marlin"
    assert _awq_marlin_override("awq", AWQ, "marlin", h100) == "awq_marlin"
    assert _awq_marlin_override("awq", AWQ, "awq", h100) is None             # explicit awq keeps awq
    assert _awq_marlin_override("awq", AWQ, None, t4) is None                # SM < 80
    assert _awq_marlin_override("awq", {**AWQ, "zero_point": False}, None, h100) is None
    assert _awq_marlin_override("awq", {**AWQ, "group_size": 256}, None, h100) is None
    assert _gptq_marlin_override("gptq", GPTQ, None, h100) == "gptq_marlin"
    assert _gptq_marlin_override("gptq", GPTQ, "gptq", h100) is None
    assert _gptq_marlin_override("gptq", {**GPTQ, "sym": False}, None, h100) is None  # asymmetric never
    assert _gptq_marlin_override("gptq", {**GPTQ, "checkpoint_format": "marlin"}, None, h100) is None
    assert _gptq_marlin_override("gptq", {**GPTQ, "bits": 3}, None, h100) is None
    # on this CPU-only machine detection keeps the plain methods
    assert detect_quantization("m", {"quantization_config": AWQ}, None)[0] == "awq"
    assert detect_quantization("m", {"quantization_config": GPTQ}, None)[0] == "gptq"
