"""Gemma 3 (text): (1 + w) RMSNorms, sandwich norms, q/k norms, scaled embeddings, gelu-tanh MLP,
sliding-window layers with their own rotary base, query_pre_attn_scalar attention scale."""

from quantrt.models.decoder import CausalLM, DecoderSpec


class Gemma3ForCausalLM(CausalLM):
    spec = DecoderSpec(qk_norm=True, gemma=True)
