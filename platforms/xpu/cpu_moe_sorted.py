"""Shared base of the CPU MoE kernels: sort the T*k (token, expert) pairs by expert once, run each active
expert on its contiguous row segment (`_rows`), add the down bias, scale by the routing weights and
index_add back: no per-token Python work. Also the spec checks the kernels share."""

from __future__ import annotations

import torch

from quantrt.layers.moe.experts import grouped_layout, uniform_acts
from quantrt.quant.moe_kernel import MoEKernel, MoESpec, expert_activation
from quantrt.quant.weights import IntWeight

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def base_checks(spec: MoESpec, kind: type) -> str:
    """"" when every expert weight is a `kind` on the CPU, the compute dtype is served and each projection's
    activation scheme is uniform; else why not."""
    if spec.compute_dtype not in COMPUTE_DTYPES:
        return f"compute dtype {spec.compute_dtype} is not float32/bfloat16/float16"
    ws = [w for ex in spec.experts for w in ex]
    if not all(isinstance(w, kind) for w in ws):
        return f"experts are {'/'.join(sorted(spec.schemes()))}, not all {kind.__name__}"
    t = ws[0].codes if hasattr(ws[0], "codes") else ws[0].data
    if t.device.type != "cpu":
        return f"experts are on {t.device.type}, not cpu"
    return uniform_acts(spec)


def same(spec: MoESpec, key) -> bool:
    return len({key(w) for ex in spec.experts for w in ex}) == 1


def int_layout(w: IntWeight) -> tuple:
    return (w.bits, w.codes.dtype, w.zero is not None, w.offset is not None, w.g_idx is not None)


def same_int(spec: MoESpec) -> bool:
    """One int layout for all experts, one group size for gate/up (K = H) and one for down (K = I)."""
    return (same(spec, int_layout) and len({w.group_size for ex in spec.experts for w in ex[:2]}) == 1
            and len({ex[2].group_size for ex in spec.experts}) == 1)


class SortedMoE(MoEKernel):
    """Shared apply: sort pairs by expert, `_rows` computes the sorted rows, weight, scatter back.
    Expert biases (fp32, b13 [E, 2I] gate then up, b2 [E, H]) and the activation (silu or clamped SwiGLU)
    come from the spec: `_act` adds the gate/up bias and applies it, `apply` adds the down bias."""

    def __init__(self, spec: MoESpec):
        self.num_experts, self.compute_dtype = spec.num_experts, spec.compute_dtype  # not the canonical experts
        self.acts13 = [a[0] for a in spec.acts]
        self.acts2 = [a[2] for a in spec.acts]
        self.activation = spec.activation
        self.b13, self.b2 = spec.biases(torch.device("cpu"))

    def _act(self, gu: torch.Tensor, rows: int | torch.Tensor) -> torch.Tensor:
        """gu: [m, 2I] gate then up of rows of expert `rows` (an int) or of experts rows [m] -> [m, I] fp32."""
        gu = gu.float()
        if self.b13 is not None:
            gu = gu + self.b13[rows]
        g, u = gu.chunk(2, dim=-1)
        return expert_activation(self.activation, g, u)

    def _rows(self, xs: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs: [M, H] rows sorted by expert; seg: [M] their expert; counts: [E] -> [M, H] fp32."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        order, tok, seg, counts = grouped_layout(ids, self.num_experts)
        y = self._rows(x[tok], seg, counts)                                    # [T*k, H] fp32
        if self.b2 is not None:
            y = y + self.b2[seg]
        y = y * weights.flatten()[order, None].to(torch.float32)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tok, y)
        return out.to(self.compute_dtype)
