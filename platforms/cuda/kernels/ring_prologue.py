"""Activation prologues of the W4A16 ring (`ring_wna16`): the op that makes a linear's input, computed in the
ring's activation load instead of in a launch of its own. In a decode step that is the residual add + RMSNorm
before q/k/v and gate/up, and act(gate) * up before down: three of a Llama layer's nine launches.

PRO (a kernel constexpr):
- PRO_NORM: x [M, K] is the residual stream, d [M, K] the delta (the last sub-layer's output), w [K] the norm
  weight. The ring's input is RMSNorm(s) * w with s = x + d, and the programs of column tile 0 write s (the new
  residual stream) to the residual buffer. Every program first sums s^2 over the whole row, so all programs use
  the same 1 / rms; the order of that sum is not the norm kernel's, so 1 / rms can differ from
  `triton_add_rms_norm`'s in its last bit.
- PRO_NORM_PARTS: x [M, K] is the residual stream with the delta already added by the ring before
  (`ring_common.residual_out`), which also left each of its column tiles' sum of squares in parts [M, P]: the
  input is RMSNorm(x) * w with 1 / rms from those P partials, and nothing is written.
- PRO_SILU / PRO_GELU: x is the merged gate_up output [M, 2K]; the input is act(gate) * up (silu, or gelu with the
  tanh approximation).
Each value is computed and rounded as layer_ops' kernels do (`_add_rms_norm_kernel`, `_act_mul_kernel`): fp32
math, the sum rounded to the model dtype, the normalized value rounded before the weight product, act(gate)
rounded before the product with up.

Cost: the ring's loop is near its instruction-issue limit at one row, and every column-tile program makes the
activations of its K slice again. So only the real rows are computed (KERNEL_MAX_M, one element a thread a step,
not the [BK, BM] tile; the rows past them are zeros in the MMA operand), and the linear takes them only at one
row (`wna16.RING_PRO_MAX_M`), where the three saved launches outweigh that work: H100 int4 Llama-8B-shaped
decode 2.24 -> 2.19 ms a step. The first version computed the whole [BM, BK] tile: 2.24 -> 2.56 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from quantrt.platforms.cuda.kernels.ring_common import gsum

PRO_NONE, PRO_NORM, PRO_SILU, PRO_GELU, PRO_NORM_PARTS = 0, 1, 2, 3, 4
KERNEL_MAX_M = 2     # rows the prologue computes, each one element a thread a step (the linear takes them at one
                     # row: wna16.RING_PRO_MAX_M)


@dataclass(frozen=True)
class RingPrologue:
    """What `ring_wna16` computes its input from. kind PRO_NORM: x is the residual; delta [M, K], weight [K] (x's
    dtype), eps, and residual [M, K] (written: x + delta). PRO_NORM_PARTS: x is the residual with the delta added,
    weight, eps, parts [M, P] fp32. PRO_SILU / PRO_GELU: x is gate_up [M, 2K]."""

    kind: int
    delta: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    eps: float = 0.0
    parts: torch.Tensor | None = None       # PRO_NORM_PARTS: [M, P] fp32 sums of squares of x's column tiles

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
            if bad or m > KERNEL_MAX_M:
                raise ValueError(f"ring add + RMSNorm prologue needs x, delta, residual [{m}, {k}] {x.dtype} with "
                                 f"unit stride along K, weight [{k}] {x.dtype}, M <= {KERNEL_MAX_M}; got "
                                 f"{', '.join(bad) or f'M={m}'}")
        elif self.kind == PRO_NORM_PARTS:
            p = self.parts
            if (self.weight is None or tuple(self.weight.shape) != (k,) or self.weight.dtype != x.dtype or p is None
                    or p.dim() != 2 or p.shape[0] != m or p.dtype != torch.float32 or p.stride(1) != 1
                    or tuple(x.shape) != (m, k) or m > KERNEL_MAX_M):
                raise ValueError(f"ring RMSNorm-from-partials prologue needs x [M <= {KERNEL_MAX_M}, {k}], weight "
                                 f"[{k}] {x.dtype} and parts [M, P] fp32; got x {tuple(x.shape)}, weight "
                                 f"{None if self.weight is None else (tuple(self.weight.shape), self.weight.dtype)}, "
                                 f"parts {None if p is None else (tuple(p.shape), p.dtype)}")
        elif self.kind in (PRO_SILU, PRO_GELU):
            if x.dim() != 2 or x.shape[1] != 2 * k or m > KERNEL_MAX_M:
                raise ValueError(f"ring act * mul prologue needs the merged gate_up output [M <= {KERNEL_MAX_M}, "
                                 f"{2 * k}], got {tuple(x.shape)}")
        else:
            raise ValueError(f"unknown ring prologue kind {self.kind} (PRO_NORM {PRO_NORM}, PRO_SILU {PRO_SILU}, "
                             f"PRO_GELU {PRO_GELU}, PRO_NORM_PARTS {PRO_NORM_PARTS})")


@gluon.jit
def _rstd(x_ptr, d_ptr, offs, km, K, eps):
    """1 / rms(x + d) of one row (the sum rounded to x's dtype, as the norm kernel rounds it)."""
    xr = gl.load(x_ptr + offs, mask=km, other=0.0)
    dr = gl.load(d_ptr + offs, mask=km, other=0.0)
    s = (xr.to(gl.float32) + dr.to(gl.float32)).to(xr.dtype).to(gl.float32)
    return gl.rsqrt(gsum(s * s, 0) / K + eps)


@gluon.jit
def norm_rstd(x_ptr, d_ptr, stride_xm, stride_dm, K, eps, NR: gl.constexpr, KP: gl.constexpr, ROW: gl.constexpr):
    """(1 / rms(x + d) of row 0, of row 1 (NR 2) or row 0's again), each whole row [KP >= K] read in this
    program's ROW layout."""
    offs = gl.arange(0, KP, layout=ROW)
    km = offs < K
    r0 = _rstd(x_ptr, d_ptr, offs, km, K, eps)
    r1 = r0
    if NR == 2:
        r1 = _rstd(x_ptr + stride_xm, d_ptr + stride_dm, offs, km, K, eps)
    return r0, r1


@gluon.jit
def parts_rstd(p_ptr, stride_pm, P, K, eps, NR: gl.constexpr, PP: gl.constexpr, ROW: gl.constexpr):
    """(1 / rms of row 0, of row 1 (NR 2) or row 0's again) from the rows' P partial sums of squares [PP >= P]."""
    offs = gl.arange(0, PP, layout=ROW)
    pm = offs < P
    r0 = gl.rsqrt(gsum(gl.load(p_ptr + offs, mask=pm, other=0.0), 0) / K + eps)
    r1 = r0
    if NR == 2:
        r1 = gl.rsqrt(gsum(gl.load(p_ptr + stride_pm + offs, mask=pm, other=0.0), 0) / K + eps)
    return r0, r1


@gluon.jit
def pro_load(x_ptr, b_ptr, w_ptr, stride_xm, stride_bm, kk, ok, NR: gl.constexpr, PRO: gl.constexpr):
    """One step's raw inputs at the K offsets kk [BK]: (x, b) of row 0, of row 1 (NR 2; else row 0's again),
    and the norm weight w (PRO_NORM; else row 0's x). x: residual or gate; b: delta or up."""
    m = (kk >= 0) & ok
    x0 = gl.load(x_ptr + kk, mask=m, other=0.0)
    b0 = x0
    if PRO != 4:
        b0 = gl.load(b_ptr + kk, mask=m, other=0.0)
    x1 = x0
    b1 = b0
    if NR == 2:
        x1 = gl.load(x_ptr + stride_xm + kk, mask=m, other=0.0)
        if PRO != 4:
            b1 = gl.load(b_ptr + stride_bm + kk, mask=m, other=0.0)
    w = x0
    if PRO == 1 or PRO == 4:
        w = gl.load(w_ptr + kk, mask=m, other=0.0)
    return x0, b0, x1, b1, w


@gluon.jit
def _row(x, b, w, r, res_ptr, write_res, PRO: gl.constexpr):
    """One row's activations [BK]; PRO_NORM also writes s = x + b at res_ptr (where write_res [BK])."""
    dt: gl.constexpr = x.dtype
    if PRO == 1 or PRO == 4:
        s = x             # PRO_NORM_PARTS: x already is the residual stream with the delta added
        if PRO == 1:
            s = (x.to(gl.float32) + b.to(gl.float32)).to(dt)
            gl.store(res_ptr, s, mask=write_res)
        return ((s.to(gl.float32) * r).to(dt).to(gl.float32) * w.to(gl.float32)).to(dt)
    g = x.to(gl.float32)
    if PRO == 3:  # gelu-tanh as g / (1 + exp(-2z)), z = sqrt(2/pi) (g + 0.044715 g^3): no cancellation
        a = g / (1.0 + gl.exp(-2.0 * (0.7978845608028654 * (g + 0.044715 * g * g * g))))
    else:         # silu
        a = g / (1.0 + gl.exp(-g))
    return (a.to(dt).to(gl.float32) * b.to(gl.float32)).to(dt)


@gluon.jit
def pro_tile(x0, b0, x1, b1, w, r0, r1, mm, res_ptr, stride_rm, write_res, NR: gl.constexpr, PRO: gl.constexpr):
    """The step's B operand [BK, BM] (rows 0..NR-1 from the raw inputs, zeros past them; mm: the BM axis offsets)
    from `pro_load`'s vectors; PRO_NORM writes the new residual rows at res_ptr [BK] (+ stride_rm for row 1)."""
    y = _row(x0, b0, w, r0, res_ptr, write_res, PRO)
    tile = gl.where(gl.expand_dims(mm, 0) == 0, gl.expand_dims(y, 1), 0.0)
    if NR == 2:
        y1 = _row(x1, b1, w, r1, res_ptr + stride_rm, write_res, PRO)
        tile = gl.where(gl.expand_dims(mm, 0) == 1, gl.expand_dims(y1, 1), tile)
    return tile.to(x0.dtype)


def prologue_reference(x: torch.Tensor, pro: RingPrologue | None, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the ring's input [M, K], the residual x + delta or None) with torch ops, rounded as the kernel rounds."""
    if pro is None:
        return x, None
    dt = x.dtype
    if pro.kind in (PRO_NORM, PRO_NORM_PARTS):
        s = (x.float() + pro.delta.float()).to(dt) if pro.kind == PRO_NORM else x
        sq = pro.parts if pro.kind == PRO_NORM_PARTS else s.float().pow(2)
        rs = torch.rsqrt(sq.sum(-1, keepdim=True) / k + pro.eps)
        return ((s.float() * rs).to(dt).float() * pro.weight.float()).to(dt), s if pro.kind == PRO_NORM else None
    g, u = x[:, :k].float(), x[:, k:].float()
    if pro.kind == PRO_GELU:
        a = g / (1.0 + torch.exp(-2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:
        a = g / (1.0 + torch.exp(-g))
    return (a.to(dt).float() * u).to(dt), None


__all__ = ["KERNEL_MAX_M", "PRO_GELU", "PRO_NONE", "PRO_NORM", "PRO_NORM_PARTS", "PRO_SILU", "RingPrologue",
           "norm_rstd", "parts_rstd", "pro_load", "pro_tile", "prologue_reference"]
