"""Bad checkpoints and bad flags fail with messages that name the problem and the options."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantrt.engine.engine import Engine
from quantrt.errors import CheckpointError, ConfigError, NotSupportedYet


@pytest.fixture
def ckpt(tiny_models, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_models["llama"][0], dst)
    return dst


def _edit(ckpt, fn) -> None:
    sd = load_file(str(ckpt / "model.safetensors"))
    fn(sd)
    save_file(sd, str(ckpt / "model.safetensors"))


def test_missing_tensor_is_named(ckpt):
    _edit(ckpt, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.weight"):
        Engine(model_path=str(ckpt), max_total_tokens=256)


def test_unused_tensor_is_named(ckpt):
    _edit(ckpt, lambda sd: sd.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.mlp\.extra\.weight"):
        Engine(model_path=str(ckpt), max_total_tokens=256)


def test_unexpected_suffix_on_a_linear_lists_what_it_expects(ckpt):
    _edit(ckpt, lambda sd: sd.__setitem__("model.layers.0.mlp.down_proj.weight_scale", torch.ones(1)))
    with pytest.raises(CheckpointError, match=r"down_proj expects weight"):
        Engine(model_path=str(ckpt), max_total_tokens=256)


def test_wrong_shape_is_named(ckpt):
    _edit(ckpt, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(3)))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \(3,\), expected \(64,\)"):
        Engine(model_path=str(ckpt), max_total_tokens=256)


def test_truncated_safetensors_file_fails_cleanly(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as e:
        Engine(model_path=str(ckpt), max_total_tokens=256)
    assert "model.safetensors" in str(e.value) or "safetensors" in type(e.value).__module__


def test_unknown_architecture_lists_the_supported_ones(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        Engine(model_path=str(ckpt), max_total_tokens=256)
    for name in ("FalconForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM"):
        assert name in str(e.value)


def test_pickle_weights_are_refused_without_the_flag(ckpt):
    sd = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    torch.save(sd, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle weights .* --load-format pt"):
        Engine(model_path=str(ckpt), max_total_tokens=256)


def test_missing_model_path_says_no_hub(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist .*cannot download"):
        Engine(model_path=str(tmp_path / "nope"), max_total_tokens=256)


def test_unbuilt_quantization_is_refused(ckpt):
    with pytest.raises(NotSupportedYet, match="is not supported yet"):
        Engine(model_path=str(ckpt), quantization="qoq")


def test_unknown_quantization_lists_options(ckpt):
    with pytest.raises(ConfigError) as e:
        Engine(model_path=str(ckpt), quantization="int3")
    assert "fp8" in str(e.value) and "compressed-tensors" in str(e.value)


def test_unknown_engine_keyword_suggests(ckpt):
    with pytest.raises(ConfigError, match="quantization"):
        Engine(model_path=str(ckpt), quantisation="fp8")


def test_gguf_flag_on_a_safetensors_directory(ckpt):
    with pytest.raises(ConfigError, match="--quantization gguf needs --model-path to be a .gguf file"):
        Engine(model_path=str(ckpt), quantization="gguf")


def test_checkpoint_with_an_unbuilt_method_is_recognised_and_refused(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "qoq", "wbits": 4, "group_size": 128}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotSupportedYet, match="'qoq' is recognised but not supported yet"):
        Engine(model_path=str(ckpt), max_total_tokens=256)
