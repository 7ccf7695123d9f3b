"""--quantization-config-path: sglang-jax YAML rules (FORMATS.md §5), the four built-in files, errors."""

from __future__ import annotations

import pytest
import torch

from quantrt.engine.engine import Engine
from quantrt.errors import ConfigError, NotSupportedYet
from quantrt.layers.linear import QuantLinear
from quantrt.quant.formats.yaml_rules import BUILTIN_DIR, YamlRulesFormat
from quantrt.quant.weights import ActKind, FloatWeight, IntWeight, ScaleGranularity
from tests.test_fp8_engine import _hf_weight, sqnr_db
from tests.test_w8a8 import _kl_vs_float

BUILTINS = {"fp8": (FloatWeight, ActKind.NONE), "fp8_w8a8": (FloatWeight, ActKind.DYNAMIC_TOKEN),
            "int8": (IntWeight, ActKind.NONE), "int8_w8a8": (IntWeight, ActKind.DYNAMIC_TOKEN)}


def _fmt(tmp_path, text: str) -> YamlRulesFormat:
    p = tmp_path / "rules.yaml"
    p.write_text(text)
    return YamlRulesFormat.from_config({"path": str(p)})


def test_the_four_builtin_files_ship():
    assert sorted(f.stem for f in BUILTIN_DIR.glob("*.yaml")) == sorted(BUILTINS)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_rules_end_to_end(tiny_models, name):
    wtype, akind = BUILTINS[name]
    path, hf = tiny_models["llama"]
    eng = Engine(model_path=str(path), quantization_config_path=name, max_total_tokens=2048)
    assert eng.quant_method == "yaml_rules"
    torch.manual_seed(0)
    for layer in (m for m in eng.model.modules() if isinstance(m, QuantLinear)):
        if layer.shards[0][0] == "lm_head":
            assert not layer.is_quantized
            continue
        assert layer.is_quantized and "reference" not in layer.kernel_desc
        x = torch.randn(8, layer.in_features)
        assert sqnr_db(x.double() @ _hf_weight(hf, layer).double().T, layer(x)) >= 25.0
    fmt = eng.quant_format
    assert fmt.act_scheme("model.layers.0.mlp.down_proj").kind is akind
    assert isinstance(fmt.make_weight("model.layers.0.mlp.down_proj", {"weight": torch.randn(8, 16)}, (8, 16)),
                      wtype)
    assert _kl_vs_float(eng, hf) < 0.01


def test_rules_paths_first_match_dense_alias_ignore_and_block(tmp_path):
    fmt = _fmt(tmp_path, """
quantization:
  weight_block_size: [32, 32]
  ignored_layers: [model.layers.1.mlp.down_proj]
  dense:
    rules:
      - module_path: 'model/layers\\[0\\]/self_attn/(q|k)_proj'
        weight_qtype: int8
        act_qtype: null
        weight_block_size: null
      - module_path: 'model/layers/\\d+/mlp/'
        weight_dtype: float8_e4m3fn
        activation_dtype: float8_e4m3fn
  moe: {weight_dtype: null, activation_dtype: null}
""")
    assert fmt.is_quantized("model.layers.0.self_attn.q_proj") and not fmt.is_quantized("model.layers.0.self_attn.v_proj")
    assert fmt.is_quantized("model.layers.3.mlp.up_proj") and not fmt.is_quantized("model.layers.1.mlp.down_proj")
    assert not fmt.is_quantized("lm_head")
    w = fmt.make_weight("model.layers.3.mlp.up_proj", {"weight": torch.randn(64, 64)}, (64, 64))
    assert isinstance(w, FloatWeight) and w.granularity is ScaleGranularity.BLOCK and w.block == (32, 32)
    assert fmt.act_scheme("model.layers.3.mlp.up_proj").group == 32
    assert isinstance(fmt.make_weight("model.layers.0.self_attn.k_proj", {"weight": torch.randn(8, 64)}, (8, 64)),
                      IntWeight)
    fmt.finish_loading()  # both rules matched something


def test_partial_rules_leave_other_layers_float(tiny_models, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("quantization:\n  linear:\n    rules:\n      - module_path: '.*/mlp/down_proj'\n"
                 "        weight_dtype: int8\n        activation_dtype: int8\n  moe: {weight_dtype: null}\n")
    eng = Engine(model_path=str(tiny_models["llama"][0]), quantization_config_path=str(p), max_total_tokens=2048)
    q = {m.shard_prefixes()[0]: m.is_quantized for m in eng.model.modules() if isinstance(m, QuantLinear)}
    assert q["model.layers.0.mlp.down_proj"] and not q["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize(("text", "err", "exc"), [
    ("quantization: [unclosed", "not valid YAML", ConfigError),
    ("other: 1", "top-level key `quantization:`", ConfigError),
    ("quantization:\n  moe: {}\n", "`linear:` (or `dense:`) with a non-empty `rules:`", ConfigError),
    ("quantization:\n  linear: {rules: []}\n  moe: {}\n", "non-empty `rules:`", ConfigError),
    ("quantization:\n  linear: {rules: [{module_path: '.*', weight_dtype: int4}]}\n  moe: {}\n",
     "unknown dtype 'int4'; choose one of: int8, float8_e4m3fn", ConfigError),
    ("quantization:\n  linear: {rules: [{module_path: '.*', weight_dtype: int8, activation_dtype: fp8}]}\n"
     "  moe: {}\n", "activation_dtype: unknown dtype 'fp8'", ConfigError),
    ("quantization:\n  linear: {rules: [{module_path: '(', weight_dtype: int8}]}\n  moe: {}\n",
     "not a valid regex", ConfigError),
    ("quantization:\n  linear: {rules: [{module_path: '.*', weight_dtype: int8}]}\n", "`moe:` section is required",
     ConfigError),
    ("quantization:\n  colour: red\n  linear: {rules: [{module_path: '.*', weight_dtype: int8}]}\n  moe: {}\n",
     "unknown key(s) under quantization: colour", ConfigError),
    ("quantization:\n  is_static_checkpoint: true\n  linear: {rules: [{module_path: '.*', weight_dtype: int8}]}\n"
     "  moe: {}\n", "is_static_checkpoint", ConfigError),
    ("quantization:\n  linear: {rules: [{module_path: '.*', weight_dtype: int8, activation_dtype: float8_e4m3fn}]}"
     "\n  moe: {}\n", "mixes int8 and fp8", NotSupportedYet),
])
def test_bad_rules_files(tmp_path, text, err, exc):
    with pytest.raises(exc) as e:
        _fmt(tmp_path, text)
    assert err in str(e.value)


def test_rule_matching_nothing_is_an_error(tiny_models, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("quantization:\n  linear:\n    rules:\n      - module_path: '.*'\n        weight_dtype: int8\n"
                 "      - module_path: 'model/vision/.*'\n        weight_dtype: int8\n  moe: {}\n")
    with pytest.raises(ConfigError, match=r"rules\[1\] module_path 'model/vision/\.\*' matched no linear layer"):
        Engine(model_path=str(tiny_models["llama"][0]), quantization_config_path=str(p), max_total_tokens=2048)


def test_missing_file_lists_builtins():
    with pytest.raises(ConfigError, match="not a built-in config \\(built-ins: fp8.yaml, fp8_w8a8.yaml, int8.yaml"):
        YamlRulesFormat.from_config({"path": "/nope/rules.yaml"})
