"""Mixture-of-experts decoders on the shared DecoderLayer: Qwen3-MoE, Qwen2-MoE (shared expert with a
sigmoid gate), Mixtral (`block_sparse_moe`, experts w1/w3/w2). Dense layers (mlp_only_layers,
decoder_sparse_step) keep the plain MLP."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from quantrt.layers.moe.layer import FusedMoE
from quantrt.layers.moe.routing import RoutingConfig
from quantrt.models.decoder import CausalLM, DecoderSpec


def _is_sparse(c: PretrainedConfig, i: int) -> bool:
    step = getattr(c, "decoder_sparse_step", 1) or 1
    return i not in (getattr(c, "mlp_only_layers", None) or []) and c.num_experts > 0 and (i + 1) % step == 0


def qwen_moe_block(c: PretrainedConfig, i: int) -> nn.Module | None:
    """Qwen2-MoE / Qwen3-MoE sparse block at model.layers.i.mlp, or None for a dense layer."""
    if not _is_sparse(c, i):
        return None
    routing = RoutingConfig(c.num_experts, c.num_experts_per_tok, renormalize=bool(c.norm_topk_prob))
    shared = getattr(c, "shared_expert_intermediate_size", 0) or 0
    return FusedMoE(f"model.layers.{i}.mlp", c.hidden_size, c.moe_intermediate_size, routing,
                    shared_inter=shared, shared_gate=shared > 0)


def mixtral_block(c: PretrainedConfig, i: int) -> nn.Module:
    """Mixtral: every layer sparse; softmax top-k renormalised; checkpoint names block_sparse_moe.*."""
    routing = RoutingConfig(c.num_local_experts, c.num_experts_per_tok, renormalize=True)
    return FusedMoE(f"model.layers.{i}.block_sparse_moe", c.hidden_size, c.intermediate_size, routing,
                    names=("w1", "w3", "w2"))


class Qwen3MoeForCausalLM(CausalLM):
    spec = DecoderSpec(qk_norm=True, moe=qwen_moe_block)


class Qwen2MoeForCausalLM(CausalLM):
    spec = DecoderSpec(qkv_bias=True, moe=qwen_moe_block)


class MixtralForCausalLM(CausalLM):
    spec = DecoderSpec(moe=mixtral_block)
