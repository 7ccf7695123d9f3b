"""Layer ops the CUDA platform swaps in for quantrt's torch math (Platform.rms_norm_op,
fused_add_rms_norm_op, act_mul_op); rotary + KV write is kernels/rope_kv_triton.py.

`triton_rms_norm` is one kernel per call where the torch RMSNorm launches about eight (cast, square,
mean, rsqrt, two products, two casts): in a decode step of a 32-layer model that is ~500 fewer
launches, the part of a CUDA-graph replay that is not weight reading. It computes exactly what
quantrt.layers.norm.RMSNorm does for plain norms: y = (x * rsqrt(mean(x^2) + eps)) rounded to x.dtype,
times the weight in x.dtype (fp32 product, rounded); and for Gemma's (1 + w) norms (an fp32 weight) the fp32
product rounded once, as RMSNorm(offset=True) computes it.

`triton_add_rms_norm` folds the residual add into the norm (the decoder carries each sub-layer's output to
the next norm): s = x + delta rounded to x.dtype (the torch add's rounding), y = RMSNorm(s); one kernel where
the add and the norm were two. `triton_act_mul` is the gated MLP's act(gate) * up over the merged gate_up
output [T, 2I] in one kernel (torch: silu or gelu-tanh, then a product: two), each step rounded to the dtype
as torch rounds it. Given `codes` (a RowCodes: the next W8A8 linear's `row_codes`), both return their output as
that linear's activation codes and scales instead (`QuantizedRows`: per-row amax or the static scale, the
quotient and rounding of `act_quant_triton.quant_rows`, bit for bit), so the linear skips its quantize launch.
They compile for ROCm too (the only inline PTX, PDL's griddepcontrol, is compiled in on sm_90+ CUDA only).

On sm_90+ CUDA, with at least PDL_MIN_ROWS rows, each is launched with programmatic dependent launch (PDL,
`kernels/pdl_triton.py`): it is scheduled while the kernel before it drains and waits (griddepcontrol.wait) for that
kernel's results before reading; it also lets the next PDL kernel launch at once (that kernel waits for this
one the same way). The norms request their weight before that wait (no kernel writes it). QUANTRT_CUDA_PDL=0
switches PDL off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels.act_quant_triton import ONE_PASS_MAX_K, code_values, row_scale
from quantrt.platforms.cuda.kernels.pdl_triton import pdl_enter, pdl_release, pdl_row_opts, pdl_wait
from quantrt.platforms.cuda.kernels.trace import t_done, t_rec, t_stamp, trace_slot
from quantrt.quant.kernel import QuantizedRows, RowCodes


@triton.jit
def scaled(sf, rstd, w, DT: tl.constexpr, F32W: tl.constexpr):
    """The normalized row times the weight, in DT: (sf * rstd) rounded to DT, times w (Llama / Qwen); with an fp32
    weight (F32W: Gemma's 1 + w) the fp32 product rounded once."""
    if F32W:
        return rne(sf * rstd * w.to(tl.float32), DT)
    return rne(rne(sf * rstd, DT).to(tl.float32) * w.to(tl.float32), DT)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, stride_x, stride_y, d, eps, BLOCK: tl.constexpr, PDL: tl.constexpr,
                     F32W: tl.constexpr = False):
    pdl_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < d
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)         # the weight is no kernel's output: before the wait
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / d + eps)
    tl.store(y_ptr + row * stride_y + offs, scaled(xf, rstd, w, x.dtype, F32W), mask=mask)


def _f32_weight(x: torch.Tensor, weight: torch.Tensor) -> dict:
    """The norm kernels' weight mode: x.dtype (the normalized row rounded, then the product), or an fp32 weight
    with narrower x (Gemma's (1 + w): the fp32 product rounded once, RMSNorm(offset=True)'s math)."""
    if weight.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"RMSNorm weight {weight.dtype} must be x's dtype ({x.dtype}) or float32 (Gemma's 1 + w)")
    return {"F32W": True} if weight.dtype != x.dtype else {}


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] fp16/bf16/fp32, weight [D] in x.dtype, or fp32 (Gemma's 1 + w: `_f32_weight`) -> [..., D]
    x.dtype."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    opts = _f32_weight(x, weight)
    if x2.shape[0]:
        block = triton.next_power_of_2(d)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), d, eps, BLOCK=block,
                                         num_warps=4 if block <= 2048 else 8, **pdl_row_opts(x2, x2.shape[0]),
                                         **opts)
    return y.reshape(x.shape)


triton_rms_norm.fp32_weight = True     # RMSNorm(offset=True) may hand it Gemma's fp32 1 + w


@triton.jit
def rne(x, DT: tl.constexpr):
    """fp32 x rounded to nearest even in DT, returned as DT. bf16 is rounded with integer ops first (exact, so the
    cast is too): Triton's CPU interpreter truncates fp32 -> bf16, the GPU rounds; both then agree with torch."""
    if DT == tl.bfloat16:
        u = x.to(tl.int32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & -65536
        return u.to(tl.float32, bitcast=True).to(DT)
    else:
        return x.to(DT)


@triton.jit
def _quant_store(y, q_ptr, qs_ptr, sa_ptr, row, offs, mask, QMAX: tl.constexpr, IS_INT: tl.constexpr,
                 STATIC: tl.constexpr):
    """Codes of the row y (fp32 of the rounded output, 0 past the mask) as `quant_rows` makes them, and its scale:
    the row amax's, or the static one at sa_ptr."""
    if STATIC:
        sc = tl.load(sa_ptr)
    else:
        sc = row_scale(tl.max(tl.abs(y), axis=0), QMAX)
    tl.store(qs_ptr + row, sc)
    tl.store(q_ptr + offs, code_values(y, sc, QMAX, IS_INT).to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, y_ptr, s_ptr, q_ptr, qs_ptr, sa_ptr, stride_x, stride_d, stride_y,
                         stride_s, d, eps, BLOCK: tl.constexpr, PDL: tl.constexpr, QUANT: tl.constexpr = False,
                         QMAX: tl.constexpr = 1.0, IS_INT: tl.constexpr = False, STATIC: tl.constexpr = False,
                         tr_ptr=None, tr_id=0, TRACE: tl.constexpr = False, F32W: tl.constexpr = False,
                         pw_ptr=None, pre_eps=0.0, PRE: tl.constexpr = False, PRE_F32W: tl.constexpr = False):
    tr_rec = t_rec(tr_ptr, tl.program_id(0), TRACE)        # `trace`: QUANTRT_CUDA_TRACE=1 timelines
    t_stamp(tr_rec, 0, TRACE)
    pdl_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < d
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)         # the weight is no kernel's output: before the wait
    if PRE:
        pw = tl.load(pw_ptr + offs, mask=mask, other=0.0)
    pdl_wait(PDL)
    t_stamp(tr_rec, 1, TRACE, 2)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    dd = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0)
    if PRE:     # Gemma's sandwich: delta is first normalized by its own (post-) norm, rounded to the dtype
        df = dd.to(tl.float32)
        dd = scaled(df, tl.rsqrt(tl.sum(df * df, axis=0) / d + pre_eps), pw, x.dtype, PRE_F32W)
    s = rne(x.to(tl.float32) + dd.to(tl.float32), x.dtype)
    tl.store(s_ptr + row * stride_s + offs, s, mask=mask)
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / d + eps)
    y = scaled(sf, rstd, w, x.dtype, F32W)
    if QUANT:  # codes [M, d] of the rounded output for the linear that reads it, instead of the output
        _quant_store(y.to(tl.float32), q_ptr + row * d, qs_ptr, sa_ptr, row, offs, mask, QMAX, IS_INT, STATIC)
    else:
        tl.store(y_ptr + row * stride_y + offs, y, mask=mask)
    t_done(tr_rec, tr_id, TRACE)


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def triton_add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                        codes: RowCodes | None = None, pre: tuple[torch.Tensor, float] | None = None
                        ) -> tuple[torch.Tensor | QuantizedRows, torch.Tensor]:
    """x, delta [..., D] (same dtype), weight [D] in x.dtype or fp32 (`_f32_weight`) -> (y, s): s = x + delta in
    x.dtype (the new residual), y = s / rms(s) * weight as triton_rms_norm computes it. `pre` (weight, eps): delta
    is first normalized by that norm, as triton_rms_norm would (Gemma's post-attention / post-MLP norm before the
    residual add: `norm.PostNormed`). With `codes` and D <= ONE_PASS_MAX_K: y comes as its activation codes and
    scales (`QuantizedRows`, bit for bit what `quant_rows` / the static quantizer make of y); wider rows return y
    itself (the linear quantizes it)."""
    if delta.shape != x.shape or delta.dtype != x.dtype:
        raise ValueError(f"fused add + RMSNorm needs delta like x: x {tuple(x.shape)} {x.dtype}, "
                         f"delta {tuple(delta.shape)} {delta.dtype}")
    d = x.shape[-1]
    if d > ONE_PASS_MAX_K:
        codes = None
    x2, d2 = _rows(x, d), _rows(delta, d)
    m = x2.shape[0]
    s = torch.empty((m, d), dtype=x.dtype, device=x.device)
    y = torch.empty_like(s) if codes is None else s
    q, qs, sa, quant = _code_buffers(s, codes, d)
    opts = _f32_weight(x, weight)
    if pre is not None:
        opts.update(pw_ptr=pre[0], pre_eps=float(pre[1]), PRE=True, PRE_F32W=bool(_f32_weight(x, pre[0])))
    if m:
        block = triton.next_power_of_2(d)
        tr, tr_id = trace_slot(x2, "add_rms_norm", m, m=m, d=d)
        _add_rms_norm_kernel[(m,)](x2, d2, weight, y, s, q, qs, sa, x2.stride(0), d2.stride(0), y.stride(0),
                                   s.stride(0), d, eps, BLOCK=block, num_warps=4 if block <= 2048 else 8,
                                   **quant, tr_ptr=tr, tr_id=tr_id, TRACE=tr is not None, **pdl_row_opts(x2, m),
                                   **opts)
    out = y.reshape(x.shape) if codes is None else QuantizedRows(q, qs)
    return out, s.reshape(x.shape)


triton_add_rms_norm.fp32_weight = True
triton_add_rms_norm.takes_pre = True   # `pre`: the delta's own norm first (RMSNorm.add_forward with PostNormed)


def _code_buffers(like: torch.Tensor, codes: RowCodes | None, d: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(codes [M, d], scales [M, 1] fp32, the static scale, the kernel's quant constexprs) for `codes`; stand-ins
    (never written) without."""
    if codes is None:
        return like, like, like, {}
    m = like.shape[0]
    q = torch.empty((m, d), dtype=codes.dtype, device=like.device)
    qs = torch.empty((m, 1), dtype=torch.float32, device=like.device)
    sa = codes.static_scale if codes.static_scale is not None else qs
    return q, qs, sa, {"QUANT": True, "QMAX": float(codes.qmax), "IS_INT": codes.dtype == torch.int8,
                       "STATIC": codes.static_scale is not None}


@triton.jit
def _act_mul_kernel(gu_ptr, o_ptr, q_ptr, qs_ptr, sa_ptr, stride_g, stride_o, n, GELU: tl.constexpr,
                    BLOCK: tl.constexpr, PDL: tl.constexpr, QUANT: tl.constexpr = False, QMAX: tl.constexpr = 1.0,
                    IS_INT: tl.constexpr = False, STATIC: tl.constexpr = False, tr_ptr=None,
                    tr_id=0, TRACE: tl.constexpr = False):
    tr_rec = t_rec(tr_ptr, tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), TRACE)   # `trace` timelines
    t_stamp(tr_rec, 0, TRACE)
    pdl_enter(PDL)
    t_stamp(tr_rec, 1, TRACE, 2)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gu_ptr + row * stride_g + offs, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_g + n + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    if GELU:  # 0.5 g (1 + tanh(z)) = g / (1 + exp(-2z)), z = sqrt(2/pi) (g + 0.044715 g^3): no cancellation
        z = 0.7978845608028654 * (gf + 0.044715 * gf * gf * gf)
        a = gf / (1.0 + tl.exp(-2.0 * z))
    else:     # silu: g / (1 + exp(-g))
        a = gf / (1.0 + tl.exp(-gf))
    y = rne(rne(a, g.dtype).to(tl.float32) * u.to(tl.float32), g.dtype)
    if QUANT:  # one program holds the whole row (BLOCK >= n): its codes instead of the output
        _quant_store(y.to(tl.float32), q_ptr + row * n, qs_ptr, sa_ptr, row, offs, mask, QMAX, IS_INT, STATIC)
    else:
        tl.store(o_ptr + row * stride_o + offs, y, mask=mask)
    t_done(tr_rec, tr_id, TRACE)


def triton_act_mul(gu: torch.Tensor, gelu_tanh: bool = False, codes: RowCodes | None = None
                   ) -> torch.Tensor | QuantizedRows:
    """gu [T, 2I] (gate columns then up columns, fp16/bf16/fp32) -> act(gate) * up [T, I] in gu.dtype;
    act = silu, or gelu with the tanh approximation (Gemma). With `codes` and I <= ONE_PASS_MAX_K (one program
    holds a row): the result as its activation codes and scales (`QuantizedRows`), as `triton_add_rms_norm` makes
    them; wider rows return the result itself."""
    if gu.dim() != 2 or gu.shape[1] % 2:
        raise ValueError(f"act * mul needs the merged gate_up output [T, 2I], got {tuple(gu.shape)}")
    if gu.stride(1) != 1:
        gu = gu.contiguous()
    t, n = gu.shape[0], gu.shape[1] // 2
    if n > ONE_PASS_MAX_K:
        codes = None
    out = torch.empty((t, n), dtype=gu.dtype, device=gu.device) if codes is None else gu
    q, qs, sa, quant = _code_buffers(out, codes, n)                        # out: stand-in rows [T, ...]
    if t:
        block = min(1024, triton.next_power_of_2(n)) if codes is None else triton.next_power_of_2(n)
        warps = 4 if codes is None else min(16, max(4, block // 512))
        tr, tr_id = trace_slot(gu, "act_mul", t * triton.cdiv(n, block), rows=t, n=n)
        _act_mul_kernel[(t, triton.cdiv(n, block))](gu, out, q, qs, sa, gu.stride(0), out.stride(0), n,
                                                    GELU=gelu_tanh, BLOCK=block, num_warps=warps, **quant,
                                                    tr_ptr=tr, tr_id=tr_id, TRACE=tr is not None, **pdl_row_opts(gu, t))
    return out if codes is None else QuantizedRows(q, qs)
