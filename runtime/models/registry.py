"""Architectures by Hugging Face `architectures` name, imported lazily on first use."""

from __future__ import annotations

import importlib

from quantrt.errors import ConfigError

_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "quantrt.models.llama",
    "MistralForCausalLM": "quantrt.models.llama",
    "Qwen2ForCausalLM": "quantrt.models.qwen",
    "Qwen3ForCausalLM": "quantrt.models.qwen",
    "Gemma3ForCausalLM": "quantrt.models.gemma3",
    "Qwen3MoeForCausalLM": "quantrt.models.moe",
    "Qwen2MoeForCausalLM": "quantrt.models.moe",
    "MixtralForCausalLM": "quantrt.models.moe",
    "DeepseekV2ForCausalLM": "quantrt.models.deepseek",
    "DeepseekV3ForCausalLM": "quantrt.models.deepseek",
    "GptOssForCausalLM": "quantrt.models.gpt_oss",
}


# Configs without `architectures` (GGUF metadata) fall back to their model_type.
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "mixtral": "MixtralForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM", "gpt_oss": "GptOssForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_model_class(architectures: list[str] | None, model_type: str | None = None) -> type:
    """The first architecture of the checkpoint that we implement; otherwise a clear error."""
    if not architectures and model_type in _BY_MODEL_TYPE:
        architectures = [_BY_MODEL_TYPE[model_type]]
    for name in architectures or []:
        if name in _ARCHITECTURES:
            return getattr(importlib.import_module(_ARCHITECTURES[name]), name)
    raise ConfigError(f"unsupported model architecture {architectures!r}; supported architectures: "
                      f"{', '.join(supported_architectures())}")
