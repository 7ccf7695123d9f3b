"""aiter for RMSNorm, rotary and MoE top-k on ROCm (SGLANG_USE_AITER=1 / QUANTRT_USE_AITER=1, FORMATS.md §4.4).

`AiterLayerOps` is mixed into the ROCm platforms: its rms_norm_op / rotary_op / topk_op (the Platform hooks
the layers call) return aiter-backed callables when aiter is switched on, else None (quantrt's own math).
Each callable keeps the contract of the op it replaces and hands cases aiter does not cover back to ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from quantrt.platforms.rocm.aiter_adapter import AiterOps

if TYPE_CHECKING:
    from quantrt.layers.moe.routing import RoutingConfig

NEOX = 0  # aiter rotate_style: rotate halves (what RotaryEmbedding computes)


class AiterRmsNorm:
    """RMSNorm through aiter.rmsnorm2d_fwd: x [..., D] -> [..., D] (x.dtype)."""

    name = "aiter_rmsnorm2d_fwd"

    def __init__(self, ops: AiterOps):
        self.ops = ops

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.ops.rmsnorm2d_fwd(x.reshape(-1, x.shape[-1]), weight, eps).reshape(*lead, x.shape[-1])


class AiterRotary:
    """Neox rotary through aiter.rope_cached_positions_2c_fwd_inplace on copies of q and k (one call for both)."""

    name = "aiter_rope_cached_positions_2c"

    def __init__(self, ops: AiterOps):
        self.ops = ops

    def __call__(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, H, D], k: [T, Hkv, D]; cos/sin: [P, D/2] -> aiter's [S=1, B=T, H, D] and [P, 1, 1, D/2]
        qo, ko = q.unsqueeze(0).clone(), k.unsqueeze(0).clone()
        p = cos.shape[0]
        self.ops.rope_cached_positions_2c_fwd_inplace(qo, ko, cos.reshape(p, 1, 1, -1), sin.reshape(p, 1, 1, -1),
                                                      positions.reshape(1, -1), NEOX, True, False)
        return qo[0], ko[0]


class AiterTopK:
    """MoE routing through aiter: topk_softmax (softmax, no groups, no bias), biased_grouped_topk (sigmoid +
    correction bias, DeepSeek-V3), grouped_topk (grouped, no bias). Other combinations (sigmoid without
    bias and groups) run quantrt's select_experts."""

    name = "aiter_topk"

    def __init__(self, ops: AiterOps):
        self.ops = ops

    def __call__(self, logits: torch.Tensor, cfg: RoutingConfig, bias: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        from quantrt.layers.moe.routing import select_experts

        t, k = logits.shape[0], cfg.top_k
        w = torch.empty(t, k, dtype=torch.float32, device=logits.device)
        ids = torch.empty(t, k, dtype=torch.int32, device=logits.device)
        g = logits.float()
        if cfg.scoring == "softmax" and cfg.n_group == 1 and bias is None:
            tei = torch.empty(t, k, dtype=torch.int32, device=logits.device)
            self.ops.topk_softmax(w, ids, tei, g, cfg.renormalize)
            w = w * cfg.routed_scaling_factor if cfg.routed_scaling_factor != 1.0 else w
        elif cfg.scoring == "sigmoid" and bias is not None:
            self.ops.biased_grouped_topk(g, bias.float(), w, ids, cfg.n_group, cfg.topk_group, cfg.renormalize,
                                         cfg.routed_scaling_factor)
        elif bias is None and cfg.n_group > 1:
            self.ops.grouped_topk(g, w, ids, cfg.n_group, cfg.topk_group, cfg.renormalize, cfg.scoring,
                                  cfg.routed_scaling_factor)
        else:
            return select_experts(logits, cfg, bias)
        return w, ids.long()


class AiterLayerOps:
    """Mixin for ROCm platforms that have `aiter_ops()` (None when aiter is off)."""

    def aiter_ops(self) -> Any:  # provided by the platform class
        raise NotImplementedError

    def rms_norm_op(self) -> AiterRmsNorm | None:
        ops = self.aiter_ops()
        return AiterRmsNorm(ops) if ops is not None else None

    def rotary_op(self) -> AiterRotary | None:
        ops = self.aiter_ops()
        return AiterRotary(ops) if ops is not None else None

    def topk_op(self) -> AiterTopK | None:
        ops = self.aiter_ops()
        return AiterTopK(ops) if ops is not None else None
