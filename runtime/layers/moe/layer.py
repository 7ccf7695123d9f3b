"""FusedMoE: router + routed experts (+ optional shared expert), loaded strictly by checkpoint name.

The layer claims the tensors under its checkpoint prefix that the generic router cannot place
(router weight, correction bias, shared-expert gate, expert tensors in either layout); the shared
expert is made of ordinary QuantLinears. After loading, dense experts are stacked into
w13 [E, 2I, H] / w2 [E, H, I] and run grouped; quantized experts keep their canonical weights and run
the reference (dequantize the active experts, then matmul) with a one-time notice.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from quantrt.errors import CheckpointError
from quantrt.layers.linear import QuantLinear
from quantrt.layers.moe.expert_loader import ExpertLoader
from quantrt.layers.moe.experts import moe_grouped, moe_reference
from quantrt.layers.moe.routing import RoutingConfig, select_experts
from quantrt.quant.weights import DenseWeight

log = logging.getLogger(__name__)


class SharedExpert(nn.Module):
    """A plain SwiGLU MLP at `<prefix>` (gate_proj/up_proj/down_proj)."""

    def __init__(self, prefix: str, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = QuantLinear(prefix, [("gate_proj", inter), ("up_proj", inter)], hidden)
        self.down_proj = QuantLinear(prefix, [("down_proj", hidden)], inter)
        self.n = inter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up_proj(x)                                         # [T, 2I]
        return self.down_proj(F.silu(gu[..., : self.n]) * gu[..., self.n:])


class FusedMoE(nn.Module):
    """prefix: checkpoint path of the block ("model.layers.3.mlp"); names: the expert projections'
    checkpoint names in (gate, up, down) order; shared_inter > 0 adds a shared expert at
    `<prefix>.<shared_name>`, gated by sigmoid(`shared_expert_gate`) when shared_gate."""

    def __init__(self, prefix: str, hidden: int, inter: int, routing: RoutingConfig,
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"), router: str = "gate",
                 correction_bias: bool = False, shared_inter: int = 0, shared_name: str = "shared_expert",
                 shared_gate: bool = False):
        super().__init__()
        self.prefix, self.hidden, self.inter, self.routing = prefix, hidden, inter, routing
        self.loader: ExpertLoader | None = ExpertLoader(prefix, routing.num_experts, hidden, inter, names)
        e = routing.num_experts
        self.wanted: dict[str, tuple[int, ...]] = {f"{router}.weight": (e, hidden)}
        if correction_bias:
            self.wanted[f"{router}.e_score_correction_bias"] = (e,)
        if shared_gate:
            self.wanted["shared_expert_gate.weight"] = (1, hidden)
        self.small: dict[str, torch.Tensor] = {}
        self.router_key, self.bias_key = f"{router}.weight", f"{router}.e_score_correction_bias"
        self.shared = SharedExpert(f"{prefix}.{shared_name}", hidden, shared_inter) if shared_inter else None
        self.w13: torch.Tensor | None = None                              # [E, 2I, H] dense experts
        self.w2: torch.Tensor | None = None                               # [E, H, I]
        self.qexperts: list | None = None                                 # quantized: per expert (g, u, d)
        self.dtype = torch.float32
        self.impl = "unloaded"

    # -- loading ----------------------------------------------------------------------------
    def claim(self, name: str, t: torch.Tensor, fmt) -> bool:
        """Take `name` if it belongs to this block and is not an ordinary QuantLinear tensor."""
        rel = name[len(self.prefix) + 1:]
        if rel in self.wanted:
            if tuple(t.shape) != self.wanted[rel]:
                raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, expected {self.wanted[rel]}")
            if rel in self.small:
                raise CheckpointError(f"tensor {name} appears twice in the checkpoint")
            self.small[rel] = t
            return True
        return rel.startswith("experts.") and self.loader.add(rel[len("experts."):], t, fmt)

    def missing(self) -> list[str]:
        out = [f"{self.prefix}.{k}" for k in self.wanted if k not in self.small]
        return out + self.loader.missing()

    def finish_loading(self, dtype: torch.dtype, device: torch.device) -> None:
        """Stack dense experts (or keep canonical quantized ones); cast router tensors."""
        self.dtype = dtype
        experts = self.loader.weights()
        self.loader = None
        self.small = {k: v.to(device=device, dtype=torch.float32 if "bias" in k else dtype)
                      for k, v in self.small.items()}
        if all(isinstance(w, DenseWeight) for ex in experts for w in ex):
            self.w13 = torch.stack([torch.cat([g.data, u.data]) for g, u, _ in experts]).to(device, dtype)
            self.w2 = torch.stack([d.data for _, _, d in experts]).to(device, dtype)
            self.impl = "grouped" if hasattr(torch, "_grouped_mm") else "reference"
        else:
            self.qexperts = experts
            self.impl = "reference"
            log.info("%s: %s experts run the reference MoE (dequantize active experts + matmul)",
                     self.prefix, type(experts[0][0]).__name__)

    # -- compute ------------------------------------------------------------------------------
    def _expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qexperts is None:
            return self.w13[e], self.w2[e]
        g, u, d = self.qexperts[e]
        return torch.cat([g.dequantize(self.dtype), u.dequantize(self.dtype)]), d.dequantize(self.dtype)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, impl: str | None = None
                ) -> torch.Tensor:
        # x: [T, H]; weights, ids: [T, k] -> [T, H]
        if (impl or self.impl) == "grouped":
            return moe_grouped(x, weights, ids, self.w13, self.w2)
        return moe_reference(x, weights, ids, self.routing.num_experts, self._expert)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] -> [T, H]
        logits = F.linear(x, self.small[self.router_key])                 # [T, E]
        weights, ids = select_experts(logits, self.routing, self.small.get(self.bias_key))
        y = self.experts(x, weights.to(x.dtype), ids)
        if self.shared is not None:
            s = self.shared(x)
            gate = self.small.get("shared_expert_gate.weight")
            y = y + (torch.sigmoid(F.linear(x, gate)) * s if gate is not None else s)
        return y
