"""The gpt-oss MoE block at `model.layers.N.mlp`, loaded strictly from the fused transformers layout.

Router with bias: logits = x W^T + b; the top-k logits are softmaxed among themselves.
Experts with biases and a clamped SwiGLU (alpha 1.702, limit 7.0 from the config):
    g = min(gate, limit);  u = clamp(up, -limit, limit);  h = (u + 1) * g * sigmoid(alpha * g)

Checkpoint tensors under `<prefix>` (E experts, hidden H, intermediate I):
    router.weight [E, H], router.bias [E]
    experts.gate_up_proj [E, H, 2I]  (columns interleave gate (even) and up (odd))   | MXFP4:
    experts.down_proj [E, I, H]                                                       |   `<proj>_blocks`,
    experts.gate_up_proj_bias [E, 2I] (interleaved too), experts.down_proj_bias [E, H] |   `<proj>_scales`
MXFP4 projections (quantrt.quant.formats.mxfp4) store rows = output features: gate_up [E, 2I, H/32, 16]
with interleaved rows, down [E, H, I/32, 16]. Both layouts become per expert canonical weights
gate [I, H], up [I, H], down [H, I] (de-interleaved once at load) and one MoESpec with the clamped SwiGLU
activation and the expert biases; the platform's MoE kernel selection picks who runs them (dense: `grouped`,
torch._grouped_mm; MXFP4: `triton_moe` on CUDA, one launch per projection; else `reference`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from quantrt.errors import CheckpointError
from quantrt.layers.moe.layer import FusedMoE
from quantrt.layers.moe.routing import RoutingConfig
from quantrt.quant.moe_kernel import MoEKernel, MoESpec, select_moe_kernel
from quantrt.quant.weights import WEIGHT_ONLY, DenseWeight, MicroWeight, QuantizedWeight

log = logging.getLogger(__name__)

PROJS = ("gate_up_proj", "down_proj")


def _rows(w: QuantizedWeight, sl: slice) -> QuantizedWeight:
    """Rows `sl` of a canonical weight (dense or MXFP4)."""
    if isinstance(w, DenseWeight):
        return DenseWeight(w.data[sl])
    if isinstance(w, MicroWeight):
        return MicroWeight(w.codes[sl], w.scale[sl], w.block, w.global_scale)
    raise CheckpointError(f"gpt-oss experts: cannot split a {type(w).__name__}")


def _to(w: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> QuantizedWeight:
    if isinstance(w, DenseWeight):
        return DenseWeight(w.data.to(device=device, dtype=dtype))
    return MicroWeight(w.codes.to(device), w.scale.to(device), w.block, w.global_scale)


class GptOssMoE(FusedMoE):
    """prefix: "model.layers.N.mlp"; alpha/limit: the config's swiglu_alpha / swiglu_limit."""

    def __init__(self, prefix: str, hidden: int, inter: int, num_experts: int, top_k: int,
                 alpha: float = 1.702, limit: float = 7.0):
        # A FusedMoE to the loader and the model (claim / missing / finish_loading / forward), all
        # overridden here: FusedMoE's own state (ExpertLoader, kernels) does not apply to this layout.
        nn.Module.__init__(self)
        self.prefix, self.hidden, self.inter = prefix, hidden, inter
        self.routing = RoutingConfig(num_experts, top_k)
        e = num_experts
        self.wanted: dict[str, tuple[int, ...]] = {
            "router.weight": (e, hidden), "router.bias": (e,),
            "experts.gate_up_proj_bias": (e, 2 * inter), "experts.down_proj_bias": (e, hidden)}
        self.small: dict[str, torch.Tensor] = {}
        self.spec: MoESpec | None = None                                  # kept only when keep_canonical
        self.kernel: MoEKernel | None = None
        self.kernel_choice = ""                                           # selection, explained
        self.quantized = False
        self.dtype = torch.float32
        self.impl = "unloaded"                                            # the MoE kernel's name
        self.topk_op = None
        self.alpha, self.limit = alpha, limit
        self.raw: dict[str, torch.Tensor] = {}                            # expert tensors as they arrive
        self.expert_w: dict[str, list[QuantizedWeight]] = {}              # proj -> E weights [N, K]

    # -- loading ----------------------------------------------------------------------------
    def _shapes(self, proj: str) -> tuple[int, int]:
        """[N, K] of one expert's projection."""
        return (2 * self.inter, self.hidden) if proj == "gate_up_proj" else (self.hidden, self.inter)

    def _expected(self, fmt) -> dict[str, tuple[int, ...]]:
        e, out = self.routing.num_experts, {}
        for proj in PROJS:
            n, k = self._shapes(proj)
            names = frozenset({"weight"})
            if fmt is not None and fmt.is_quantized(f"{self.prefix}.experts.{proj}"):
                if not hasattr(fmt, "make_experts"):
                    raise CheckpointError(f"{self.prefix}.experts: gpt-oss experts load as bf16/fp32 or "
                                          f"MXFP4 (checkpoint or online); {fmt.name} experts are not supported")
                names = fmt.tensor_names(f"{self.prefix}.experts.{proj}")[0]
            for s in names:                                               # shapes of blocks/scales: the format's
                out.update({proj: (e, k, n)} if s == "weight" else {f"{proj}_{s}": ()})   # dense: [E, K, N]
        return out

    def claim(self, name: str, t: torch.Tensor, fmt) -> bool:
        """Take `name` if it is one of this block's tensors (router, expert biases, expert weights)."""
        if self.claim_small(name, t):
            return True
        rel = name[len(self.prefix) + 1:]
        if not rel.startswith("experts."):
            return False
        rel = rel[len("experts."):]
        want = self._expected(fmt)
        if rel not in want:
            raise CheckpointError(f"unexpected tensor {name}: {self.prefix}.experts expects "
                                  f"{', '.join(sorted(want) + ['down_proj_bias', 'gate_up_proj_bias'])}")
        if rel in self.raw or any(rel == p or rel.startswith(p + "_") for p in self.expert_w):
            raise CheckpointError(f"tensor {name} appears twice in the checkpoint")
        if want[rel] and tuple(t.shape) != want[rel]:
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, expected {want[rel]} "
                                  f"([experts, in, out], transformers' gpt-oss layout)")
        self.raw[rel] = t
        self._convert_ready(fmt, want)
        return True

    def _convert_ready(self, fmt, want: dict[str, tuple[int, ...]]) -> None:
        """Turn a projection into per-expert canonical weights [N, K] once all its tensors arrived."""
        for proj in PROJS:
            names = [n for n in want if n == proj or n.startswith(proj + "_")]
            if proj in self.expert_w or not all(n in self.raw for n in names):
                continue
            parts = {n[len(proj) + 1:] if n != proj else "weight": self.raw.pop(n) for n in names}
            n, k = self._shapes(proj)
            lin = f"{self.prefix}.experts.{proj}"
            if "weight" in parts:
                parts["weight"] = parts["weight"].transpose(1, 2)         # [E, K, N] -> [E, N, K]
            if fmt is not None and fmt.is_quantized(lin):
                self.expert_w[proj] = fmt.make_experts(lin, parts, (self.routing.num_experts, n, k))
            else:
                self.expert_w[proj] = [DenseWeight(w) for w in parts["weight"]]

    def missing(self) -> list[str]:
        out = [f"{self.prefix}.{k}" for k in self.wanted if k not in self.small]
        pending = sorted(self.raw)
        for proj in PROJS:
            if proj not in self.expert_w:
                have = [n for n in pending if n.startswith(proj)]
                out += [f"{self.prefix}.experts.{proj}" + (f" (has only {', '.join(have)})" if have else "")]
        return out

    def finish_loading(self, dtype: torch.dtype, device: torch.device, platform=None) -> None:
        """De-interleave gate/up, move to the device, build the MoESpec (clamped SwiGLU, expert biases) and
        select / prepare the platform's MoE kernel (quantrt.quant.moe_kernel)."""
        self.dtype = dtype
        if platform is None:
            from quantrt.platform.resolve import current_platform

            platform = current_platform()
        small = {k: v.to(device=device, dtype=dtype) for k, v in self.small.items()}
        self.small = {k: small[k] for k in ("router.weight", "router.bias")}
        b13 = small["experts.gate_up_proj_bias"]                          # [E, 2I] interleaved
        gate_up, down = self.expert_w.pop("gate_up_proj"), self.expert_w.pop("down_proj")
        experts = tuple((_to(_rows(gu, slice(0, None, 2)), device, dtype), _to(_rows(gu, slice(1, None, 2)), device, dtype),
                         _to(d, device, dtype)) for gu, d in zip(gate_up, down))
        spec = MoESpec(experts, tuple((WEIGHT_ONLY,) * 3 for _ in experts), self.hidden, self.inter, dtype,
                       ("swiglu_clamped", self.alpha, self.limit), gate_bias=b13[:, 0::2].contiguous(),
                       up_bias=b13[:, 1::2].contiguous(), down_bias=small["experts.down_proj_bias"])
        choice = select_moe_kernel(spec, platform)
        self.kernel = choice.kernel.prepare(spec, platform)
        self.impl, self.kernel_choice = choice.kernel.name, choice.explain()
        self.quantized = spec.schemes() != {"dense"}
        log.info("%s: %s -> MoE kernel %s", self.prefix, spec.describe(), self.kernel_choice)
        self.spec = spec if self.keep_canonical else None   # the kernel holds what it needs

    @property
    def kernel_desc(self) -> str:
        return self.kernel_choice

    # -- compute ------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (weights [T, k] fp32, ids [T, k]): softmax over the top-k biased logits."""
        logits = F.linear(x, self.small["router.weight"], self.small["router.bias"])     # [T, E]
        top = logits.topk(self.routing.top_k, dim=-1)
        return top.values.float().softmax(-1), top.indices

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; weights, ids: [T, k] -> [T, H]
        return self.kernel.apply(x, weights, ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] -> [T, H]
        weights, ids = self.route(x)
        return self.experts(x, weights, ids)
