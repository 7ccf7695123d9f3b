"""DeepSeek-V2 / V3: MLA attention (layers/mla.py) over a latent KV cache, and DeepSeekMoE blocks —
shared experts (n_shared_experts x moe_intermediate_size) plus routed experts — after the first
`first_k_dense_replace` dense layers (every `moe_layer_freq`-th layer after that is sparse).

Routing (`topk_method`):
- greedy: softmax (or `scoring_func`) top-k over all experts (V2);
- group_limited_greedy: keep the `topk_group` of `n_group` groups with the best single expert, then
  top-k inside them (V2);
- noaux_tc: sigmoid scores plus `e_score_correction_bias` (selection only), groups ranked by the sum of
  their best two biased scores (V3, the default for DeepseekV3ForCausalLM).
Weights are renormalised when norm_topk_prob (and top_k > 1), then times routed_scaling_factor.
Multi-token-prediction layers of the checkpoint (`model.layers.{L..L+num_nextn_predict_layers-1}`)
are not part of the causal LM and are skipped at load, as transformers does.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import PretrainedConfig

from quantrt.engine.kv_pool import KVGeometry
from quantrt.errors import ConfigError
from quantrt.layers.mla import MLAttention
from quantrt.layers.moe.layer import FusedMoE
from quantrt.layers.moe.routing import RoutingConfig
from quantrt.models.decoder import CausalLM, DecoderSpec

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING = ("softmax", "sigmoid")


def _is_sparse(c: PretrainedConfig, i: int) -> bool:
    freq = getattr(c, "moe_layer_freq", 1) or 1
    return bool(getattr(c, "n_routed_experts", None)) and i >= (c.first_k_dense_replace or 0) and i % freq == 0


def deepseek_routing(c: PretrainedConfig, v3: bool) -> RoutingConfig:
    """The RoutingConfig a DeepSeek config describes; unknown or incomplete settings are ConfigErrors."""
    method = getattr(c, "topk_method", None) or ("noaux_tc" if v3 else "greedy")
    if method not in TOPK_METHODS:
        raise ConfigError(f"DeepSeek topk_method {method!r} is not supported; options: {', '.join(TOPK_METHODS)}")
    scoring = getattr(c, "scoring_func", None) or ("sigmoid" if v3 else "softmax")
    if scoring not in SCORING:
        raise ConfigError(f"DeepSeek scoring_func {scoring!r} is not supported; options: {', '.join(SCORING)}")
    k = getattr(c, "num_experts_per_tok", None)
    if not isinstance(k, int) or k <= 0:
        raise ConfigError(f"DeepSeek MoE needs num_experts_per_tok (a positive integer), got {k!r}")
    groups, topk_group = 1, 1
    if method != "greedy":
        groups, topk_group = getattr(c, "n_group", None), getattr(c, "topk_group", None)
        if not isinstance(groups, int) or not isinstance(topk_group, int) or groups <= 0 or topk_group <= 0:
            raise ConfigError(f"DeepSeek topk_method {method!r} needs n_group and topk_group (positive "
                              f"integers), got n_group={groups!r}, topk_group={topk_group!r}")
    renorm = bool(getattr(c, "norm_topk_prob", False)) and k > 1
    return RoutingConfig(c.n_routed_experts, k, scoring=scoring, renormalize=renorm, n_group=groups,
                         topk_group=topk_group, routed_scaling_factor=float(c.routed_scaling_factor or 1.0))


def _moe_block(v3: bool):
    def block(c: PretrainedConfig, i: int) -> nn.Module | None:
        if not _is_sparse(c, i):
            return None
        routing = deepseek_routing(c, v3)
        method = getattr(c, "topk_method", None) or ("noaux_tc" if v3 else "greedy")
        return FusedMoE(f"model.layers.{i}.mlp", c.hidden_size, c.moe_intermediate_size, routing,
                        correction_bias=method == "noaux_tc",
                        shared_inter=(getattr(c, "n_shared_experts", 0) or 0) * c.moe_intermediate_size,
                        shared_name="shared_experts")
    return block


class _DeepseekCausalLM(CausalLM):
    """CausalLM with MLA layers: a latent KV cache, absorbed kv_b_proj weights after loading."""

    def __init__(self, config: PretrainedConfig, max_positions: int):
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{type(self).__name__}: hidden_act {act!r} is not supported; options: silu")
        super().__init__(config, max_positions)
        n, extra = config.num_hidden_layers, getattr(config, "num_nextn_predict_layers", 0) or 0
        self._mtp = re.compile(rf"model\.layers\.({'|'.join(str(n + j) for j in range(extra))})\.") if extra else None

    def kv_geometry(self) -> KVGeometry:
        """One latent row (kv_lora_rank + qk_rope_head_dim) per token and layer, no V."""
        c = self.config
        return KVGeometry(c.num_hidden_layers, 1, c.kv_lora_rank + c.qk_rope_head_dim, has_v=False)

    def skip_checkpoint_tensor(self, name: str) -> bool:
        """Multi-token-prediction layers (after the last decoder layer) are not loaded."""
        return self._mtp is not None and self._mtp.match(name) is not None

    def finish_loading(self, dtype: torch.dtype, platform) -> None:
        super().finish_loading(dtype, platform)
        for m in self.modules():
            if isinstance(m, MLAttention):
                m.finish_loading(dtype, platform.device())


class DeepseekV2ForCausalLM(_DeepseekCausalLM):
    spec = DecoderSpec(moe=_moe_block(v3=False), attention=MLAttention)


class DeepseekV3ForCausalLM(_DeepseekCausalLM):
    spec = DecoderSpec(moe=_moe_block(v3=True), attention=MLAttention)
