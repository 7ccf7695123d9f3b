"""Activation prologues of the W4A16 ring (`ring_wna16`): the op that makes a linear's input, computed in the
ring's activation load instead of in a launch of its own. In a decode step that is the residual add + RMSNorm
before q/k/v and gate/up, and act(gate) * up before down: three of a Llama layer's nine launches.

PRO (a kernel constexpr):
- PRO_NORM: x [M, K] is the residual stream, d [M, K] the delta (the last sub-layer's output), w [K] the norm
  weight. The ring's input is RMSNorm(s) * w with s = x + d, and the programs of column tile 0 write s (the new
  residual stream) to the residual buffer. Every program first sums s^2 over the whole row (M <= NORM_MAX_M
  rows), so all programs use the same 1 / rms; the order of that sum is not the norm kernel's, so 1 / rms can
  differ from `triton_add_rms_norm`'s in its last bit.
- PRO_SILU / PRO_GELU: x is the merged gate_up output [M, 2K]; the input is act(gate) * up (silu, or gelu with the
  tanh approximation).
Each value is computed and rounded as layer_ops' kernels do (`_add_rms_norm_kernel`, `_act_mul_kernel`): fp32
math, the sum rounded to the model dtype, the normalized value rounded before the weight product, act(gate)
rounded before the product with up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from quantrt.platforms.cuda.kernels.ring_common import gsum

PRO_NONE, PRO_NORM, PRO_SILU, PRO_GELU = 0, 1, 2, 3
NORM_MAX_M = 2       # rows whose 1 / rms every program computes from the whole row (the batch-1/2 decode steps)


@dataclass(frozen=True)
class RingPrologue:
    """What `ring_wna16` computes its input from. kind PRO_NORM: x is the residual; delta [M, K], weight [K] (x's
    dtype), eps, and residual [M, K] (written: x + delta). PRO_SILU / PRO_GELU: x is gate_up [M, 2K]."""

    kind: int
    delta: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    eps: float = 0.0

    def check(self, x: torch.Tensor, k: int) -> None:
        """Raise ValueError naming the problem when x / the tensors do not fit a ring over K input features."""
        m = x.shape[0]
        if self.kind == PRO_NORM:
            want = (m, k)
            bad = [f"{n} {tuple(t.shape)} {t.dtype}" for n, t in (("x", x), ("delta", self.delta),
                                                                  ("residual", self.residual))
                   if t is None or tuple(t.shape) != want or t.dtype != x.dtype or t.stride(-1) != 1]
            if self.weight is None or tuple(self.weight.shape) != (k,) or self.weight.dtype != x.dtype:
                bad.append(f"weight {None if self.weight is None else (tuple(self.weight.shape), self.weight.dtype)}")
            if bad or m > NORM_MAX_M:
                raise ValueError(f"ring add + RMSNorm prologue needs x, delta, residual [{m}, {k}] {x.dtype} with "
                                 f"unit stride along K, weight [{k}] {x.dtype}, M <= {NORM_MAX_M}; got "
                                 f"{', '.join(bad) or f'M={m}'}")
        elif self.kind in (PRO_SILU, PRO_GELU):
            if x.dim() != 2 or x.shape[1] != 2 * k:
                raise ValueError(f"ring act * mul prologue needs the merged gate_up output [M, {2 * k}], got "
                                 f"{tuple(x.shape)}")
        else:
            raise ValueError(f"unknown ring prologue kind {self.kind} (PRO_NORM {PRO_NORM}, PRO_SILU {PRO_SILU}, "
                             f"PRO_GELU {PRO_GELU})")


@gluon.jit
def norm_rstd(x_ptr, d_ptr, stride_xm, stride_dm, K, eps, offs_m, NR: gl.constexpr, KP: gl.constexpr,
              ROW: gl.constexpr):
    """[BM] (offs_m's layout): 1 / rms(x + d) of rows 0..NR-1 (the sum rounded to x's dtype, as the norm kernel
    rounds it), 0 for the other rows; the whole row [KP >= K] read in this program's ROW layout."""
    offs = gl.arange(0, KP, layout=ROW)
    km = offs < K
    rs = offs_m.to(gl.float32) * 0.0
    for r in gl.static_range(NR):
        xr = gl.load(x_ptr + r * stride_xm + offs, mask=km, other=0.0)
        dr = gl.load(d_ptr + r * stride_dm + offs, mask=km, other=0.0)
        s = (xr.to(gl.float32) + dr.to(gl.float32)).to(xr.dtype).to(gl.float32)
        rs = gl.where(offs_m == r, gl.rsqrt(gsum(s * s, 0) / K + eps), rs)
    return rs


@gluon.jit
def norm_x(x, d, w, rs):
    """One step's activations: x, d [BM, BK] (residual, delta), w [BK] the norm weight, rs [BM] 1 / rms ->
    (RMSNorm(s) * w, s) with s = x + d, both [BM, BK] in x's dtype."""
    dt: gl.constexpr = x.dtype
    s = (x.to(gl.float32) + d.to(gl.float32)).to(dt)
    y = ((s.to(gl.float32) * gl.expand_dims(rs, 1)).to(dt).to(gl.float32) * gl.expand_dims(w.to(gl.float32), 0))
    return y.to(dt), s


@gluon.jit
def act_x(g, u, GELU: gl.constexpr):
    """One step's activations: act(g) * u, [BM, BK] in g's dtype (act: silu, or gelu with the tanh
    approximation written as g / (1 + exp(-2z)), z = sqrt(2/pi) (g + 0.044715 g^3))."""
    dt: gl.constexpr = g.dtype
    gf = g.to(gl.float32)
    if GELU:
        z = 0.7978845608028654 * (gf + 0.044715 * gf * gf * gf)
        a = gf / (1.0 + gl.exp(-2.0 * z))
    else:
        a = gf / (1.0 + gl.exp(-gf))
    return (a.to(dt).to(gl.float32) * u.to(gl.float32)).to(dt)


def prologue_reference(x: torch.Tensor, pro: RingPrologue | None, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the ring's input [M, K], the residual x + delta or None) with torch ops, rounded as the kernel rounds."""
    if pro is None:
        return x, None
    dt = x.dtype
    if pro.kind == PRO_NORM:
        s = (x.float() + pro.delta.float()).to(dt)
        rs = torch.rsqrt(s.float().pow(2).sum(-1, keepdim=True) / k + pro.eps)
        return ((s.float() * rs).to(dt).float() * pro.weight.float()).to(dt), s
    g, u = x[:, :k].float(), x[:, k:].float()
    if pro.kind == PRO_GELU:
        a = g / (1.0 + torch.exp(-2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:
        a = g / (1.0 + torch.exp(-g))
    return (a.to(dt).float() * u).to(dt), None


__all__ = ["NORM_MAX_M", "PRO_GELU", "PRO_NONE", "PRO_NORM", "PRO_SILU", "RingPrologue", "act_x", "norm_rstd",
           "norm_x", "prologue_reference"]
