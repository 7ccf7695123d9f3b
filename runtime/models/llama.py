"""Llama (incl. Llama-3 rope scaling) and Mistral: the plain decoder."""

from quantrt.models.decoder import CausalLM, DecoderSpec


class LlamaForCausalLM(CausalLM):
    spec = DecoderSpec()


class MistralForCausalLM(CausalLM):
    spec = DecoderSpec()
