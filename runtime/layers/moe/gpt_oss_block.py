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
gate [I, H], up [I, H], down [H, I] (de-interleaved once at load). Dense experts are stacked and run
grouped (torch._grouped_mm); quantized ones run a loop over the active experts, each projection through
the platform's linear kernel for its canonical weight (TritonFp4Kernel on CUDA, the reference elsewhere).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from quantrt.errors import CheckpointError
from quantrt.layers.moe.layer import FusedMoE
from quantrt.layers.moe.routing import RoutingConfig
from quantrt.quant.kernel import LinearKernel, LinearSpec, select_linear_kernel
from quantrt.quant.weights import WEIGHT_ONLY, DenseWeight, MicroWeight, QuantizedWeight

log = logging.getLogger(__name__)

PROJS = ("gate_up_proj", "down_proj")


def clamped_swiglu(gu: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gu: [n, 2I] (gate columns first, then up) -> [n, I]."""
    g, u = gu.chunk(2, dim=-1)
    g = g.clamp(max=limit)
    u = u.clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


def _rows(w: QuantizedWeight, sl: slice) -> QuantizedWeight:
    """Rows `sl` of a canonical weight (dense or MXFP4)."""
    if isinstance(w, DenseWeight):
        return DenseWeight(w.data[sl])
    if isinstance(w, MicroWeight):
        return MicroWeight(w.codes[sl], w.scale[sl], w.block, w.global_scale)
    raise CheckpointError(f"gpt-oss experts: cannot split a {type(w).__name__}")


def _cat_rows(a: QuantizedWeight, b: QuantizedWeight) -> QuantizedWeight:
    """[Na, K] and [Nb, K] of one kind -> [Na + Nb, K] (gate rows, then up rows)."""
    if isinstance(a, MicroWeight) and isinstance(b, MicroWeight):
        return MicroWeight(torch.cat([a.codes, b.codes]), torch.cat([a.scale, b.scale]), a.block, a.global_scale)
    return DenseWeight(torch.cat([a.dequantize(torch.float32), b.dequantize(torch.float32)]))


def _to(w: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> QuantizedWeight:
    if isinstance(w, DenseWeight):
        return DenseWeight(w.data.to(device=device, dtype=dtype))
    return MicroWeight(w.codes.to(device), w.scale.to(device), w.block, w.global_scale)


def _grouped_ok(dtype: torch.dtype, platform) -> bool:
    """torch._grouped_mm runs on CPU in any float dtype, on GPUs in bf16 with capability >= 9.0."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if platform.is_cpu:
        return True
    cap = platform.capability()
    return dtype == torch.bfloat16 and cap is not None and (cap.major, cap.minor) >= (9, 0)


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
        self.w13: torch.Tensor | None = None                              # [E, 2I, H] dense experts
        self.w2: torch.Tensor | None = None                               # [E, H, I]
        self.quant_experts: list | None = None                            # quantized: per expert (g, u, d)
        self.expert_kernels: list[tuple[LinearKernel, LinearKernel]] | None = None   # per expert (w13, w2)
        self.kernel_desc = ""
        self.dtype = torch.float32
        self.impl = "unloaded"
        self.alpha, self.limit = alpha, limit
        self.raw: dict[str, torch.Tensor] = {}                            # expert tensors as they arrive
        self.expert_w: dict[str, list[QuantizedWeight]] = {}              # proj -> E weights [N, K]
        self.b13: torch.Tensor | None = None                              # [E, 2I] gate first, then up
        self.b2: torch.Tensor | None = None                               # [E, H]

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
        rel = name[len(self.prefix) + 1:]
        if rel in self.wanted:
            if tuple(t.shape) != self.wanted[rel]:
                raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, expected {self.wanted[rel]}")
            if rel in self.small:
                raise CheckpointError(f"tensor {name} appears twice in the checkpoint")
            self.small[rel] = t
            return True
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
        """De-interleave gate/up, move to the device; stack dense experts for the grouped path."""
        self.dtype = dtype
        if platform is None:
            from quantrt.platform.resolve import current_platform

            platform = current_platform()
        small = {k: v.to(device=device, dtype=dtype) for k, v in self.small.items()}
        self.small = {k: small[k] for k in ("router.weight", "router.bias")}
        b13 = small["experts.gate_up_proj_bias"]                          # [E, 2I] interleaved
        self.b13 = torch.cat([b13[:, 0::2], b13[:, 1::2]], dim=1)
        self.b2 = small["experts.down_proj_bias"]
        gate_up, down = self.expert_w.pop("gate_up_proj"), self.expert_w.pop("down_proj")
        experts = [(_to(_rows(gu, slice(0, None, 2)), device, dtype), _to(_rows(gu, slice(1, None, 2)), device, dtype),
                    _to(d, device, dtype)) for gu, d in zip(gate_up, down)]
        if all(isinstance(w, DenseWeight) for ex in experts for w in ex):
            self.w13 = torch.stack([torch.cat([g.data, u.data]) for g, u, _ in experts])   # [E, 2I, H]
            self.w2 = torch.stack([d.data for _, _, d in experts])                       # [E, H, I]
            self.impl = "grouped" if _grouped_ok(dtype, platform) else "reference"
            return
        self.quant_experts = experts
        kernels, descs = [], set()
        for g, u, d in experts:
            pair = []
            for w in (_cat_rows(g, u), d):
                spec = LinearSpec(w, WEIGHT_ONLY, dtype)
                choice = select_linear_kernel(spec, platform)
                pair.append(choice.kernel.prepare(spec, platform))
                descs.add(choice.explain())
            kernels.append(tuple(pair))
        self.expert_kernels = kernels
        self.impl, self.kernel_desc = "per_expert", " | ".join(sorted(descs))
        log.info("%s: %s experts run one linear kernel per active expert: %s", self.prefix,
                 type(experts[0][0]).__name__, self.kernel_desc)

    @property
    def qexperts(self) -> list | None:
        """Per expert (gate, up, down) canonical weights when they are quantized, else None."""
        return self.quant_experts

    # -- compute ------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (weights [T, k] fp32, ids [T, k]): softmax over the top-k biased logits."""
        logits = F.linear(x, self.small["router.weight"], self.small["router.bias"])     # [T, E]
        top = logits.topk(self.routing.top_k, dim=-1)
        return top.values.float().softmax(-1), top.indices

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, impl: str | None = None
                ) -> torch.Tensor:
        # x: [T, H]; weights, ids: [T, k] -> [T, H]
        if (impl or self.impl) == "grouped":
            return self._grouped(x, weights, ids)
        return self._reference(x, weights, ids)

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.flatten()
        order = flat.argsort(stable=True)                                 # [T*k] sorted by expert
        tok, seg = order // ids.shape[1], flat[order]
        offs = torch.bincount(flat, minlength=self.routing.num_experts).cumsum(0).to(torch.int32)
        gu = torch._grouped_mm(x[tok], self.w13.transpose(1, 2), offs=offs) + self.b13[seg]       # [T*k, 2I]
        y = torch._grouped_mm(clamped_swiglu(gu, self.alpha, self.limit), self.w2.transpose(1, 2), offs=offs)
        y = (y + self.b2[seg]) * weights.flatten()[order, None].to(y.dtype)                      # [T*k, H]
        return torch.zeros_like(x).index_add_(0, tok, y)

    def _reference(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """A loop over the experts that received tokens (dense matrices, or each expert's linear kernels):
        rows sorted by expert once, one host sync for the per-expert counts."""
        flat = ids.flatten()
        order = flat.argsort(stable=True)                                 # [T*k] sorted by expert
        tok = order // ids.shape[1]
        counts = torch.bincount(flat, minlength=self.routing.num_experts).tolist()
        xs = x[tok]                                                       # [T*k, H]
        ys = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts):
            if c:
                rows = slice(start, start + c)
                ys[rows] = self._project(e, 1, clamped_swiglu(self._project(e, 0, xs[rows]), self.alpha, self.limit))
                start += c
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, tok, ys)

    def _project(self, e: int, which: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's gate_up (which 0: [n, H] -> [n, 2I]) or down (1: [n, I] -> [n, H]), bias included."""
        bias = self.b13[e] if which == 0 else self.b2[e]
        if self.expert_kernels is not None:
            return self.expert_kernels[e][which].apply(x, bias)
        return F.linear(x, self.w13[e] if which == 0 else self.w2[e], bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] -> [T, H]
        weights, ids = self.route(x)
        return self.experts(x, weights, ids)
