"""Activation rows a linear's kernel makes itself: the op that would produce them (the residual add + RMSNorm
before q/k/v and gate/up, act(gate) * up before down) hands its inputs to the one linear that reads them, and
that linear's kernel computes them in its activation load, saving the op's launch (a decode step's small
kernels are latency, not bytes).

The producer asks first (`QuantLinear.takes_pending(m, kind)`, from `LinearKernel.takes_pending`); a linear
handed rows it does not take calls `materialize()`, which runs the producer's own op: the same numbers either way.
The other direction: a linear whose output is added to the residual stream next can add it itself
(`QuantLinear.forward_residual`, kind RESIDUAL_ADD) and leave the next norm its partial sums of squares
(`SummedRows`), so that norm reads a few partials instead of the whole row (`PendingNormParts`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

ADD_RMS_NORM = "add_rms_norm"
NORM_PARTS = "rms_norm_parts"    # RMSNorm of a residual a producer already summed, from its partial sums of squares
SILU_MUL = "silu_mul"
GELU_MUL = "gelu_mul"
RESIDUAL_ADD = "residual_add"    # not rows: a producer that adds the residual to its output (`SummedRows`)


class PendingRows:
    """Rows [M, K] not computed yet. `kind` says by which op; `materialize()` computes them with it."""

    kind: ClassVar[str] = ""

    @property
    def shape(self) -> torch.Size:
        raise NotImplementedError

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class PendingNorm(PendingRows):
    """RMSNorm(x + delta) * weight, the norm layer's `add_forward`. `residual` [M, K] is where x + delta (the new
    residual stream, which the caller already holds) is written by whoever computes the rows. `op` is the
    platform's fused add + RMSNorm: (x, delta, weight, eps) -> (y, x + delta)."""

    x: torch.Tensor
    delta: torch.Tensor
    weight: torch.Tensor
    eps: float
    residual: torch.Tensor
    op: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    kind: ClassVar[str] = ADD_RMS_NORM

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    def materialize(self) -> torch.Tensor:
        y, s = self.op(self.x, self.delta, self.weight, self.eps)
        self.residual.copy_(s)
        return y


@dataclass(frozen=True)
class SummedRows:
    """A linear's output already added to the residual stream (`QuantLinear.forward_residual`): s [M, N] = r + y,
    rounded as r + y rounds it, and where the kernel made them, the sums of squares of s over its column tiles
    (parts [M, P] fp32) for the norm that reads s next (`PendingNormParts`)."""

    s: torch.Tensor
    parts: torch.Tensor | None = None


@dataclass(frozen=True)
class PendingNormParts(PendingRows):
    """RMSNorm(s) * weight where s already is the summed residual (`SummedRows`) and parts its sums of squares:
    1 / rms comes from the P partials instead of the row. `op` is the platform's RMSNorm: (s, weight, eps) -> y."""

    s: torch.Tensor
    parts: torch.Tensor
    weight: torch.Tensor
    eps: float
    op: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    kind: ClassVar[str] = NORM_PARTS

    @property
    def shape(self) -> torch.Size:
        return self.s.shape

    def materialize(self) -> torch.Tensor:
        return self.op(self.s, self.weight, self.eps)


@dataclass(frozen=True)
class PendingActMul(PendingRows):
    """act(gate) * up over the merged gate_up output gu [M, 2I] (silu, or with `gelu` gelu-tanh). `op` is the
    platform's act_mul op: (gu, gelu) -> [M, I]."""

    gu: torch.Tensor
    gelu: bool
    op: Callable[[torch.Tensor, bool], torch.Tensor]

    @property
    def kind(self) -> str:  # type: ignore[override]
        return GELU_MUL if self.gelu else SILU_MUL

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.gu.shape[0], self.gu.shape[1] // 2))

    def materialize(self) -> torch.Tensor:
        return self.op(self.gu, self.gelu)


__all__ = ["ADD_RMS_NORM", "GELU_MUL", "NORM_PARTS", "RESIDUAL_ADD", "SILU_MUL", "PendingActMul", "PendingNorm",
           "PendingNormParts", "PendingRows", "SummedRows"]
