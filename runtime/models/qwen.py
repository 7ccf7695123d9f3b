"""Qwen2 (biased q/k/v) and Qwen3 (per-head q/k RMSNorm, no bias)."""

from quantrt.models.decoder import CausalLM, DecoderSpec


class Qwen2ForCausalLM(CausalLM):
    spec = DecoderSpec(qkv_bias=True)


class Qwen3ForCausalLM(CausalLM):
    spec = DecoderSpec(qk_norm=True)
