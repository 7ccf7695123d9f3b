"""FusedMoE: router + routed experts (+ optional shared expert), loaded strictly by checkpoint name.

The layer claims the tensors under its checkpoint prefix that the generic router cannot place
(router weight, correction bias, shared-expert gate, expert tensors in either layout); the shared
expert is made of ordinary QuantLinears. After loading, the experts' canonical weights and activation
schemes form an MoESpec and the platform's MoE kernel selection (quantrt.quant.moe_kernel) picks who
runs them: a platform kernel, else `grouped` (dense, torch._grouped_mm) or `reference`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from quantrt.errors import CheckpointError
from quantrt.layers.linear import QuantLinear
from quantrt.layers.moe.expert_loader import ExpertLoader
from quantrt.layers.moe.routing import RoutingConfig, select_experts
from quantrt.quant.moe_kernel import MoEKernel, MoESpec, select_moe_kernel

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
    `<prefix>.<shared_name>`, gated by sigmoid(`shared_expert_gate`) when shared_gate.

    After loading, the block keeps only its prepared kernel (which holds what it computes with), not the
    canonical expert weights: `keep_canonical = True` (tests that compare them with the checkpoint) keeps
    `spec` / `qexperts` at the cost of their full size beside the kernel's tensors."""

    keep_canonical = False

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
        self.spec: MoESpec | None = None
        self.kernel: MoEKernel | None = None
        self.kernel_choice = ""                                           # selection, explained
        self.dtype = torch.float32
        self.impl = "unloaded"                                            # the MoE kernel's name
        self.topk_op = None                                               # the platform's top-k op, if any

    # -- loading ----------------------------------------------------------------------------
    def claim_small(self, name: str, t: torch.Tensor) -> bool:
        """Take `name` if it is one of the block's own small tensors (router, biases, shared gate)."""
        rel = name[len(self.prefix) + 1:]
        if rel not in self.wanted:
            return False
        if tuple(t.shape) != self.wanted[rel]:
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, expected {self.wanted[rel]}")
        if rel in self.small:
            raise CheckpointError(f"tensor {name} appears twice in the checkpoint")
        self.small[rel] = t
        return True

    def claim(self, name: str, t: torch.Tensor, fmt) -> bool:
        """Take `name` if it belongs to this block and is not an ordinary QuantLinear tensor."""
        if self.claim_small(name, t):
            return True
        rel = name[len(self.prefix) + 1:]
        return rel.startswith("experts.") and self.loader.add(rel[len("experts."):], t, fmt)

    def missing(self) -> list[str]:
        out = [f"{self.prefix}.{k}" for k in self.wanted if k not in self.small]
        return out + self.loader.missing()

    def finish_loading(self, dtype: torch.dtype, device: torch.device, platform=None) -> None:
        """Build the MoESpec from the loaded experts, select and prepare the MoE kernel; cast router tensors."""
        if platform is None:
            from quantrt.platform.resolve import current_platform

            platform = current_platform()
        self.dtype = dtype
        self.spec = MoESpec(tuple(self.loader.weights()), tuple(self.loader.act_schemes()), self.hidden,
                            self.inter, dtype)
        self.loader = None
        self.small = {k: v.to(device=device, dtype=torch.float32 if "bias" in k else dtype)
                      for k, v in self.small.items()}
        self.topk_op = platform.topk_op()                                 # None = select_experts' own code
        choice = select_moe_kernel(self.spec, platform)
        self.kernel = choice.kernel.prepare(self.spec, platform)
        self.impl, self.kernel_choice = choice.kernel.name, choice.explain()
        log.info("%s: %s -> MoE kernel %s", self.prefix, self.spec.describe(), self.kernel_choice)
        if not self.keep_canonical:
            self.spec = None  # the kernel holds what it needs (the reference kernel: the canonical experts)

    @property
    def qexperts(self) -> tuple | None:
        """Per expert (gate, up, down) canonical weights when they are quantized and kept, else None."""
        return None if self.spec is None or self.spec.schemes() == {"dense"} else self.spec.experts

    # -- compute ------------------------------------------------------------------------------
    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; weights, ids: [T, k] -> [T, H]
        return self.kernel.apply(x, weights, ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] -> [T, H]
        logits = F.linear(x, self.small[self.router_key])                 # [T, E]
        weights, ids = select_experts(logits, self.routing, self.small.get(self.bias_key), self.topk_op)
        y = self.experts(x, weights.to(x.dtype), ids)
        if self.shared is not None:
            s = self.shared(x)
            gate = self.small.get("shared_expert_gate.weight")
            y = y + (torch.sigmoid(F.linear(x, gate)) * s if gate is not None else s)
        return y
