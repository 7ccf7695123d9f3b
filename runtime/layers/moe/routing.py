"""Expert selection: softmax or sigmoid scores, (grouped) top-k, renormalisation, scaling.

One function covers the routers of the families we run:
- Mixtral / Qwen2-MoE / Qwen3-MoE: softmax over all experts, top-k, optional renormalisation;
- DeepSeek-V2/V3: grouped top-k (pick `topk_group` of `n_group` groups by group score, then top-k
  inside them), sigmoid scores with an `e_score_correction_bias` that steers selection only, and a
  `routed_scaling_factor`.

Every op here has a data-independent output shape and reads nothing back on the host, so decode CUDA
graphs capture it (tests/test_cuda_moe_graphs.py checks the op list).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantrt.errors import ConfigError


@dataclass(frozen=True)
class RoutingConfig:
    """top_k of num_experts; scoring "softmax" | "sigmoid"; n_group/topk_group for grouped top-k."""

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ConfigError(f"MoE top_k {self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.scoring not in ("softmax", "sigmoid"):
            raise ConfigError(f"MoE scoring {self.scoring!r} is not one of softmax, sigmoid")
        if self.num_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
            raise ConfigError(f"MoE grouped top-k: {self.num_experts} experts in {self.n_group} groups, "
                              f"topk_group {self.topk_group}")


def select_experts(logits: torch.Tensor, cfg: RoutingConfig, correction_bias: torch.Tensor | None = None,
                   op=None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [T, E] -> (weights [T, k] fp32, ids [T, k] int64). `op`: the platform's top-k op
    (Platform.topk_op, e.g. aiter's topk_softmax / biased_grouped_topk), same contract; None = the code below."""
    if op is not None:
        return op(logits, cfg, correction_bias)
    scores = logits.float().softmax(-1) if cfg.scoring == "softmax" else logits.float().sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()[None, :]
    if cfg.n_group > 1:
        t = choice.shape[0]
        groups = choice.view(t, cfg.n_group, -1)                          # [T, G, E/G]
        if correction_bias is None:
            gscore = groups.amax(-1)                                      # V2: best expert per group
        else:
            gscore = groups.topk(2, -1).values.sum(-1)                    # V3: sum of the best two
        keep = torch.zeros_like(gscore).scatter_(1, gscore.topk(cfg.topk_group, -1).indices, 1.0)   # [T, G]
        keep = keep.bool()[:, :, None].expand(groups.shape).reshape(t, -1)                      # [T, E]
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = choice.topk(cfg.top_k, -1).indices                              # [T, k]
    weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return weights, ids
