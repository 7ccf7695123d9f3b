"""Fused-MoE kernels: how to run a layer's routed experts on this platform.

y[t] = sum_j weights[t, j] * (down_e(act(gate_e(x[t]) + bg_e, up_e(x[t]) + bu_e)) + bd_e),  e = ids[t, j].

act (MoESpec.activation): "silu" -> silu(g) * u (SwiGLU, the default), or ("swiglu_clamped", alpha, limit)
-> g' = min(g, limit), u' = clamp(u, -limit, limit), (u' + 1) * g' * sigmoid(alpha g') (gpt-oss).
The per-expert biases bg/bu [E, I] and bd [E, H] are optional (None: no bias; gpt-oss has all three).

Like linear kernels (quantrt.quant.kernel): a kernel class says whether it can serve a layer's experts
(`can_implement -> (ok, reason)`), repacks them once (`prepare`) and computes (`apply`). Platforms list
their MoE kernels in preference order (`Platform.moe_kernels()`); selection takes the first that can,
and otherwise the portable kernels of quantrt.layers.moe.experts run: `grouped` for dense experts,
`reference` (dequantize the active experts, matmul) for everything else, with a one-time warning that
names every rejected kernel and why.

Expert weights are canonical weights (quantrt.quant.weights), one per expert and projection:
gate [I, H], up [I, H], down [H, I]; each has its activation scheme (ActScheme), as the format gave it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from quantrt.errors import CheckpointError
from quantrt.quant.weights import ActScheme, DenseWeight, FloatWeight, IntWeight, QuantizedWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

log = logging.getLogger(__name__)

Expert = tuple[QuantizedWeight, QuantizedWeight, QuantizedWeight]   # (gate [I, H], up [I, H], down [H, I])
ExpertActs = tuple[ActScheme, ActScheme, ActScheme]
Activation = str | tuple   # "silu" | ("swiglu_clamped", alpha, limit)


def check_activation(act: Activation) -> Activation:
    """The activation descriptor, validated (a clear error names the options)."""
    if act == "silu":
        return act
    if (isinstance(act, tuple) and len(act) == 3 and act[0] == "swiglu_clamped"
            and all(isinstance(v, (int, float)) for v in act[1:]) and act[2] > 0):
        return ("swiglu_clamped", float(act[1]), float(act[2]))
    raise CheckpointError(f"MoE activation {act!r}: expected \"silu\" or (\"swiglu_clamped\", alpha, limit > 0)")


def expert_activation(act: Activation, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The gated activation of one expert's gate / up outputs g, u [n, I] -> [n, I] (same dtype)."""
    if act == "silu":
        return torch.nn.functional.silu(g) * u
    _, alpha, limit = act
    g = g.clamp(max=limit)
    u = u.clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


def activation_name(act: Activation) -> str:
    return act if isinstance(act, str) else f"{act[0]}(alpha={act[1]:g}, limit={act[2]:g})"


def weight_scheme(w: QuantizedWeight) -> str:
    """A short name of a canonical weight's scheme: bf16-like "dense", "fp8-channel", "int4-g128-asym" ..."""
    if isinstance(w, DenseWeight):
        return "dense"
    if isinstance(w, FloatWeight):
        d = "fp8" if w.data.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz) else "fp8e5m2"
        return f"{d}-{w.granularity}" + (f"{w.block[0]}x{w.block[1]}" if w.block else "")
    if isinstance(w, IntWeight):
        g = "channel" if w.group_size == w.shape[1] else f"g{w.group_size}"
        z = "asym" if w.zero is not None else ("offset" if w.offset is not None else "sym")
        return f"int{w.bits}-{g}-{z}" + ("-actorder" if w.g_idx is not None else "")
    return type(w).__name__


@dataclass(frozen=True, eq=False)
class MoESpec:
    """What an MoE kernel needs to decide whether it can serve a layer's routed experts.

    experts: E entries of (gate, up, down) canonical weights; acts: E entries of their ActSchemes;
    compute_dtype: the dtype of x and of the output; activation: "silu" (SwiGLU experts) or
    ("swiglu_clamped", alpha, limit); gate_bias / up_bias [E, I], down_bias [E, H]: per-expert biases or None.
    """

    experts: tuple[Expert, ...]
    acts: tuple[ExpertActs, ...]
    hidden: int
    inter: int
    compute_dtype: torch.dtype
    activation: Activation = "silu"
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.experts) != len(self.acts) or not self.experts:
            raise CheckpointError(f"MoE spec: {len(self.experts)} experts but {len(self.acts)} activation schemes")
        object.__setattr__(self, "activation", check_activation(self.activation))
        e = len(self.experts)
        for name, want in (("gate_bias", (e, self.inter)), ("up_bias", (e, self.inter)),
                           ("down_bias", (e, self.hidden))):
            b = getattr(self, name)
            if b is not None and tuple(b.shape) != want:
                raise CheckpointError(f"MoE {name}: shape {tuple(b.shape)}, expected {want} ([experts, features])")
        want = ((self.inter, self.hidden), (self.inter, self.hidden), (self.hidden, self.inter))
        for e, ex in enumerate(self.experts):
            for w, shape, proj in zip(ex, want, ("gate", "up", "down")):
                if tuple(w.shape) != shape:
                    raise CheckpointError(f"MoE expert {e} {proj}: weight shape {tuple(w.shape)}, expected {shape}")

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def schemes(self) -> frozenset[str]:
        """Every weight scheme present among the experts (a uniform layer has one)."""
        return frozenset(weight_scheme(w) for ex in self.experts for w in ex)

    def act_schemes(self) -> frozenset[str]:
        return frozenset(str(a) for ex in self.acts for a in ex)

    def uniform(self) -> tuple[str, str] | None:
        """(weight scheme, act scheme) when every expert projection shares them, else None."""
        s, a = self.schemes(), self.act_schemes()
        return (next(iter(s)), next(iter(a))) if len(s) == 1 and len(a) == 1 else None

    @property
    def has_bias(self) -> bool:
        return any(b is not None for b in (self.gate_bias, self.up_bias, self.down_bias))

    def biases(self, device: torch.device | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(b13 [E, 2I] gate then up, b2 [E, H]) in fp32 on `device` (zeros where one side is absent),
        or (None, None) without biases."""
        if not self.has_bias:
            return None, None
        e, i, h = self.num_experts, self.inter, self.hidden
        dev = device if device is not None else next(b for b in (self.gate_bias, self.up_bias, self.down_bias)
                                                     if b is not None).device

        def f32(b: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
            return torch.zeros(shape, device=dev) if b is None else b.to(device=dev, dtype=torch.float32)

        return (torch.cat([f32(self.gate_bias, (e, i)), f32(self.up_bias, (e, i))], 1).contiguous(),
                f32(self.down_bias, (e, h)).contiguous())

    def describe(self) -> str:
        extra = "" if self.activation == "silu" else f", {activation_name(self.activation)}"
        extra += ", with biases" if self.has_bias else ""
        return (f"{'/'.join(sorted(self.schemes()))} experts, activations {'/'.join(sorted(self.act_schemes()))}"
                + extra)


class MoEKernel(ABC):
    """One prepared MoE layer: holds the repacked expert tensors and computes the routed experts.

    graph_safe: True when `apply` never reads a device value on the host and its launches do not depend
    on the routing (fixed grids, worst-case padded buffers), so decode CUDA graphs may capture it."""

    name: ClassVar[str]
    graph_safe: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: MoESpec, platform: Platform) -> tuple[bool, str]:
        """(True, "") when this kernel serves `spec` on `platform`, else (False, why not)."""

    @classmethod
    @abstractmethod
    def prepare(cls, spec: MoESpec, platform: Platform) -> MoEKernel:
        """Repack the experts once after loading (onto platform.device()) and return the ready kernel."""

    @abstractmethod
    def apply(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H] compute_dtype; weights: [T, k] float; ids: [T, k] int64 -> [T, H] compute_dtype."""


@dataclass(frozen=True)
class MoEKernelChoice:
    kernel: type[MoEKernel]
    rejected: tuple[tuple[str, str], ...]  # (kernel name, reason) of every kernel tried before

    def explain(self) -> str:
        why = "; ".join(f"{n}: {r}" for n, r in self.rejected)
        return f"{self.kernel.name}" + (f" (skipped {why})" if why else "")


_warned: set[str] = set()


def select_moe_kernel(spec: MoESpec, platform: Platform) -> MoEKernelChoice:
    """First MoE kernel of the platform that can implement `spec`; else the portable grouped kernel
    (dense experts) or the reference kernel (anything else, with a one-time warning)."""
    from quantrt.layers.moe.experts import GroupedMoEKernel, ReferenceMoEKernel

    rejected: list[tuple[str, str]] = []
    for k in [*platform.moe_kernels(), GroupedMoEKernel]:
        ok, reason = k.can_implement(spec, platform)
        if ok:
            return MoEKernelChoice(k, tuple(rejected))
        rejected.append((k.name, reason))
    key = spec.describe()
    if key not in _warned:
        _warned.add(key)
        why = "; ".join(f"{n}: {r}" for n, r in rejected)
        log.warning("no fast MoE kernel for %s on %s (%s): using the reference MoE kernel (slow)",
                    key, platform.name, why)
    return MoEKernelChoice(ReferenceMoEKernel, tuple(rejected))
