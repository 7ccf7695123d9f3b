"""Expert math for y = sum_j w[t, j] * down_e(act(gate_e(x)) * up_e(x)), e = ids[t, j].

Two implementations with the same contract:
- `moe_reference`: a loop over the experts that received tokens; each expert's weights come from a
  callable, so quantized experts (any canonical scheme) dequantize there. Runs everywhere.
- `moe_grouped`: tokens sorted by expert, one gather, one `torch._grouped_mm` per projection over
  stacked dense weights, one index_add. No per-expert Python work (CPU and any torch device).

Both are wrapped as the portable MoE kernels (`ReferenceMoEKernel`, `GroupedMoEKernel`) that
quantrt.quant.moe_kernel.select_moe_kernel falls back to when a platform lists none that can serve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from quantrt.quant.moe_kernel import MoEKernel, MoESpec, expert_activation
from quantrt.quant.quantize import fake_quantize_act, qmax
from quantrt.quant.weights import ActKind, ActScheme

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

Act = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (gate, up) -> hidden


def silu_and_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def moe_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                  expert: Callable[[int], tuple[torch.Tensor, torch.Tensor]], act: Act = silu_and_mul
                  ) -> torch.Tensor:
    """x: [T, H]; weights, ids: [T, k]; expert(e) -> (w13 [2I, H], w2 [H, I]) -> [T, H]."""
    out = torch.zeros_like(x)
    flat = ids.flatten()                                                  # [T*k]
    hit = torch.bincount(flat, minlength=num_experts).nonzero().flatten().tolist()
    for e in hit:
        pos = (flat == e).nonzero().flatten()                             # [n] positions in T*k
        tok = pos // ids.shape[1]
        w13, w2 = expert(e)
        g, u = F.linear(x[tok], w13).chunk(2, dim=-1)                     # [n, I] each
        y = F.linear(act(g, u), w2)                                       # [n, H]
        out.index_add_(0, tok, y * weights.flatten()[pos, None].to(y.dtype))
    return out


def moe_grouped(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, act: Act = silu_and_mul, b13: torch.Tensor | None = None,
                b2: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, H]; weights, ids: [T, k]; w13: [E, 2I, H]; w2: [E, H, I]; optional biases b13 [E, 2I],
    b2 [E, H] (x's dtype) -> [T, H]."""
    k = ids.shape[1]
    flat = ids.flatten()
    order = flat.argsort(stable=True)                                     # [T*k] sorted by expert
    tok, seg = order // k, flat[order]
    offs = torch.bincount(flat, minlength=w13.shape[0]).cumsum(0).to(torch.int32)   # [E] group ends
    xs = x[tok]                                                           # [T*k, H]
    gu = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)            # [T*k, 2I]
    if b13 is not None:
        gu = gu + b13[seg]
    g, u = gu.chunk(2, dim=-1)                                            # [T*k, I] each
    y = torch._grouped_mm(act(g, u), w2.transpose(1, 2), offs=offs)       # [T*k, H]
    if b2 is not None:
        y = y + b2[seg]
    y = y * weights.flatten()[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tok, y)


# -- portable MoE kernels (quantrt.quant.moe_kernel) -----------------------------------------------
def fake_quant_rows(x: torch.Tensor, seg: torch.Tensor, acts: list[ActScheme]) -> torch.Tensor:
    """Quantize-dequantize the rows of x exactly as the reference would per expert GEMM input.

    x: [M, K]; seg: [M] expert id of each row; acts: per expert ActScheme of this projection (one kind
    and dtype for all, checked by the caller) -> fp32 [M, K]. Per-token / per-token-group schemes are
    row-wise; dynamic per-tensor takes the amax over each expert's rows; static takes each expert's scale.
    """
    a = acts[0]
    if a.kind in (ActKind.NONE, ActKind.DYNAMIC_TOKEN, ActKind.DYNAMIC_GROUP):
        return fake_quantize_act(x, a)
    m = qmax(a.dtype)
    x32 = x.to(torch.float32)
    if a.kind is ActKind.DYNAMIC_TENSOR:
        amax = torch.zeros(len(acts), dtype=torch.float32, device=x.device)
        amax = amax.scatter_reduce(0, seg, x32.abs().amax(-1), "amax")                     # [E]
        s = (amax.clamp(min=1e-12) / m)[seg, None]                                          # [M, 1]
    else:
        s = torch.stack([ac.scale.to(torch.float32).reshape(()) for ac in acts]).to(x.device)[seg, None]
    y = (x32 / s).clamp(-m, m)
    y = y.round() if a.dtype in (torch.int8, torch.int4) else y.to(a.dtype).to(torch.float32)
    return y * s


def uniform_acts(spec: MoESpec) -> str:
    """"" when each projection's activation schemes share kind and dtype across experts (static zero
    points excluded), else why not."""
    for p, name in enumerate(("gate", "up", "down")):
        kinds = {(a[p].kind, a[p].dtype, a[p].group) for a in spec.acts}
        if len(kinds) != 1:
            return f"experts' {name} projections use different activation schemes"
        if any(a[p].zero is not None for a in spec.acts):
            return "static int8 activation zero points are not supported in MoE kernels"
    if any((a[0].kind, a[0].dtype) != (a[1].kind, a[1].dtype) for a in spec.acts):
        return "gate and up use different activation schemes"
    if any(a[0].kind is ActKind.STATIC_TENSOR and not torch.equal(a[0].scale, a[1].scale) for a in spec.acts):
        return "gate and up have different static input scales"
    return ""


def grouped_layout(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids: [T, k] -> (order [T*k] positions sorted by expert, tok [T*k] their token, seg [T*k] their
    expert, counts [E] rows per expert)."""
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    return order, order // ids.shape[1], flat[order], torch.bincount(flat, minlength=num_experts)


def _tensors_on(w, dev: torch.device) -> bool:
    return all(v.device == dev for v in vars(w).values() if isinstance(v, torch.Tensor))


def _to_device(w, dev: torch.device):
    """A canonical weight with every tensor field on `dev` (loading leaves them on the CPU)."""
    return dataclasses.replace(w, **{k: v.to(dev) for k, v in vars(w).items() if isinstance(v, torch.Tensor)})


class ReferenceMoEKernel(MoEKernel):
    """Every canonical expert scheme on every device: per active expert, fake-quantize the inputs as
    each projection's ActScheme says, dequantize its weights to fp32, matmul; fp32 accumulation."""

    name = "reference"

    def __init__(self, spec: MoESpec):
        self.spec = spec

    @classmethod
    def can_implement(cls, spec: MoESpec, platform: Platform) -> tuple[bool, str]:
        return True, ""

    @classmethod
    def prepare(cls, spec: MoESpec, platform: Platform) -> ReferenceMoEKernel:
        dev = platform.device()
        if all(_tensors_on(w, dev) for ex in spec.experts for w in ex):
            return cls(spec)
        moved = tuple(tuple(_to_device(w, dev) for w in ex) for ex in spec.experts)
        return cls(dataclasses.replace(spec, experts=moved))

    def apply(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)                    # [T, H]
        b13, b2 = self.spec.biases(x.device)                                                # fp32 or None
        i = self.spec.inter
        flat = ids.flatten()
        for e in torch.bincount(flat, minlength=self.spec.num_experts).nonzero().flatten().tolist():
            pos = (flat == e).nonzero().flatten()                                           # [n]
            tok = pos // ids.shape[1]
            (g, u, d), (ag, au, ad) = self.spec.experts[e], self.spec.acts[e]
            xe = x[tok]
            h = expert_activation(
                self.spec.activation,
                F.linear(fake_quantize_act(xe, ag), g.dequantize(torch.float32), None if b13 is None else b13[e, :i]),
                F.linear(fake_quantize_act(xe, au), u.dequantize(torch.float32), None if b13 is None else b13[e, i:]))
            y = F.linear(fake_quantize_act(h, ad), d.dequantize(torch.float32),
                         None if b2 is None else b2[e])                                     # [n, H]
            out.index_add_(0, tok, y * weights.flatten()[pos, None].float())
        return out.to(self.spec.compute_dtype)


class GroupedMoEKernel(MoEKernel):
    """Dense experts stacked into w13 [E, 2I, H] / w2 [E, H, I], run by `moe_grouped`
    (torch._grouped_mm: CPU in any float dtype; GPUs in bf16 where torch supports it, SM >= 9.0)."""

    name = "grouped"

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, spec: MoESpec | None = None):
        """spec: where the activation and biases come from (None: silu, no biases)."""
        self.w13, self.w2 = w13, w2
        self.activation = spec.activation if spec is not None else "silu"
        b13, b2 = spec.biases(w13.device) if spec is not None else (None, None)
        self.b13, self.b2 = (None, None) if b13 is None else (b13.to(w13.dtype), b2.to(w13.dtype))  # [E, 2I], [E, H]

    @classmethod
    def can_implement(cls, spec: MoESpec, platform: Platform) -> tuple[bool, str]:
        if not hasattr(torch, "_grouped_mm"):
            return False, "this torch has no _grouped_mm"
        if spec.schemes() != {"dense"}:
            return False, f"serves dense experts only, not {'/'.join(sorted(spec.schemes()))}"
        if spec.act_schemes() != {"a16"}:
            return False, "dense experts with quantized activations"
        if not platform.is_cpu:
            cap = platform.capability()
            if spec.compute_dtype != torch.bfloat16 or cap is None or (cap.major, cap.minor) < (9, 0):
                return False, f"_grouped_mm on {platform.name} needs bf16 and capability >= 9.0"
        return True, ""

    @classmethod
    def prepare(cls, spec: MoESpec, platform: Platform) -> GroupedMoEKernel:
        dev, dt = platform.device(), spec.compute_dtype

        def kn(ws: list[torch.Tensor]) -> torch.Tensor:  # [E, N, K] view over [E, K, N] memory
            # torch._grouped_mm takes B as [E, K, N]; a transposed view would be copied on every call
            return torch.stack(ws).to(dev, dt).transpose(1, 2).contiguous().transpose(1, 2)

        w13 = kn([torch.cat([g.data, u.data]) for g, u, _ in spec.experts])                     # [E, 2I, H]
        w2 = kn([d.data for _, _, d in spec.experts])                                           # [E, H, I]
        return cls(w13, w2, spec)

    def _act(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return expert_activation(self.activation, g, u)

    def apply(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return moe_grouped(x, weights.to(x.dtype), ids, self.w13, self.w2, self._act, self.b13, self.b2)
