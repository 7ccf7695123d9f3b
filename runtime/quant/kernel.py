"""Linear kernels: how to multiply a canonical quantized weight on this platform.

A kernel class says whether it can serve a weight (`can_implement -> (ok, reason)`), repacks it once
(`prepare`) and multiplies (`apply`). A prepared kernel holds only what `apply` reads (repacked tensors,
scales, shapes, act scheme, compute dtype), never the canonical weight it was built from, so a quantized
model occupies its quantized size; only kernels that dequantize per call (the reference) keep it. Platforms list their kernels in preference order; selection takes
the first that can. If none can, the portable reference kernel runs (with a one-time warning).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from quantrt.quant.weights import ActScheme, FloatWeight, QuantizedWeight, ScaleGranularity

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearSpec:
    """What a kernel needs to know to decide whether it can serve a layer."""

    weight: QuantizedWeight
    act: ActScheme
    compute_dtype: torch.dtype  # dtype of activations entering and leaving the layer

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


@dataclass(frozen=True)
class RowCodes:
    """The activation codes a kernel makes of its input rows before its GEMM (`LinearKernel.row_codes`):
    codes = x / s rounded to `dtype` (clamped to +-qmax; int8 half to even), s = max(amax(row), 1e-12) / qmax
    per row, or the checkpoint's static scale [1] fp32 when `static_scale` is set: what
    `quant.quantize.quantize_act_per_token` / `quantize_act_static` compute."""

    dtype: torch.dtype
    qmax: float
    static_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class QuantizedRows:
    """Activation rows already quantized by the op that produced them (a norm, act * mul) for the one linear
    that reads them: codes [M, K] and scales [M, 1] fp32, as the consuming kernel's `row_codes` asked."""

    codes: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


@dataclass(frozen=True)
class WeightInfo:
    """What callers may inspect of a layer's canonical weight once kernels are prepared (no tensors)."""

    kind: str                                      # canonical type name: "IntWeight", "FloatWeight", ...
    shape: tuple[int, int]                         # (N, K)
    granularity: ScaleGranularity | None = None    # FloatWeight's scale granularity, else None

    @classmethod
    def of(cls, w: QuantizedWeight) -> WeightInfo:
        gran = w.granularity if isinstance(w, FloatWeight) else None
        return cls(type(w).__name__, tuple(w.shape), gran)


class LinearKernel(ABC):
    """One prepared layer: holds the repacked tensors and computes y = x @ W^T + b."""

    name: ClassVar[str]
    # The op after this layer is small and reads before it waits for this one (the decode attention after q/k/v:
    # `QuantLinear.release_early`): a kernel launched with a dependent-launch scheme may release it at its start.
    release_early: bool = False

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        """(True, "") when this kernel serves `spec` on `platform`, else (False, why not)."""

    @classmethod
    @abstractmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> LinearKernel:
        """Repack the weight once after loading and return the ready kernel."""

    @abstractmethod
    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x: [..., K] compute_dtype -> [..., N] compute_dtype; or `QuantizedRows` where `row_codes` asked."""

    def row_codes(self, m: int) -> RowCodes | None:
        """The codes this kernel would make of M input rows first, so that the op producing x may make them
        instead and pass `QuantizedRows` to `apply`; None: pass x (the default: kernels quantize inside)."""
        return None

    def takes_pending(self, m: int, kind: str) -> bool:
        """True when `apply` computes M input rows itself from the inputs of the op `kind` would run
        (`quant.pending`: a `PendingRows` instead of x), or for kind RESIDUAL_ADD when `apply_residual` adds the
        residual in the kernel; the default: never."""
        return False

    def apply_residual(self, x, residual: torch.Tensor):
        """`SummedRows` of residual + x @ W^T (no bias), where takes_pending(M, RESIDUAL_ADD) said yes."""
        raise NotImplementedError(f"{self.name} does not add the residual in its kernel (takes_pending)")


@dataclass(frozen=True)
class KernelChoice:
    kernel: type[LinearKernel]
    rejected: tuple[tuple[str, str], ...]  # (kernel name, reason) of every kernel tried before

    def explain(self) -> str:
        why = "; ".join(f"{n}: {r}" for n, r in self.rejected)
        return f"{self.kernel.name}" + (f" (skipped {why})" if why else "")


_warned: set[str] = set()


def select_linear_kernel(spec: LinearSpec, platform: Platform) -> KernelChoice:
    """First kernel of the platform that can implement `spec`; the reference kernel otherwise."""
    from quantrt.quant.kernels.dense import DenseLinearKernel
    from quantrt.quant.kernels.reference import ReferenceLinearKernel
    from quantrt.quant.weights import DenseWeight

    rejected: list[tuple[str, str]] = []
    for k in platform.linear_kernels():
        ok, reason = k.can_implement(spec, platform)
        if ok:
            return KernelChoice(k, tuple(rejected))
        rejected.append((k.name, reason))
    if isinstance(spec.weight, DenseWeight):  # unquantized: F.linear is the portable path, no warning
        return KernelChoice(DenseLinearKernel, tuple(rejected))
    key = f"{type(spec.weight).__name__}/{spec.act}"
    if key not in _warned:
        _warned.add(key)
        why = "; ".join(f"{n}: {r}" for n, r in rejected) or "the platform lists no kernel for it"
        log.warning("no fast %s kernel for %s on %s (%s): using the reference kernel (slow)",
                    type(spec.weight).__name__, spec.act, platform.name, why)
    return KernelChoice(ReferenceLinearKernel, tuple(rejected))
