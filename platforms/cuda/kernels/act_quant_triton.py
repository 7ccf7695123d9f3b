"""Per-token activation quantization in one Triton launch (imported lazily), for the W8A8 paths on codes.

Computes exactly what `quant.quantize.quantize_act_per_token` computes: scale = max(amax, 1e-12) / QMAX,
codes = clamp(x / scale, -QMAX, QMAX) cast to fp8 (int8: rounded half to even). The torch version runs as
~6 kernels over the [M, K] fp32 copy (8192²: ~880 µs on the H100, as much as the fp8 GEMM itself).

K <= ONE_PASS_MAX_K: each program loads ROWS whole rows once into registers (BLOCK_K = next_pow2(K)),
takes their amax and writes the codes from the same registers. Wider rows: one program per row, a first
pass over K finds the amax, a second re-reads the row (from L1/L2) and writes the codes. Both launch with
programmatic dependent launch on sm_90+ (`pdl_triton`): scheduled while the norm / activation kernel that
wrote x drains.

The one-pass launch gets the fp32 quotient x / scale as RN32(x * RN64(1 / scale)) in fp64, not with an
IEEE fp32 division per element (`div.rn.f32` is a branchy sequence that made the launch compute-bound).
That is the correctly rounded quotient for every fp32 x: x / s (s an fp32) is never within 2^-49
(relative) of an fp32 rounding midpoint m (m = M 2^a with a 25-bit M, s = S 2^b with a 24-bit S: x - m s
is a nonzero multiple of 2^(a+b) or of x's last bit, so |x - m s| > 2^-49 m s), while the fp64 product
is within 2^-51.9 of x / s. Checked exhaustively for every bf16 x, every bf16 amax and both QMAX:
`bench/_quant_rows_sweep.py --prove`. `row_scale` / `code_values` are that math as jit functions, shared with the
norm and act * mul kernels that make the codes themselves (`layer_ops`).

The scale keeps the plain `/ QMAX` (Triton's fp32 `/`, as the two-pass launch always had it): torch
divides by a Python scalar as a * RN32(1 / b) on CUDA and as IEEE a / b on the CPU, and `/` matches both
(an IEEE `div_rn` here differs from torch on CUDA for some amax).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv
from quantrt.platforms.cuda.kernels.pdl_triton import pdl_enter, pdl_launch_opts

ONE_PASS_MAX_K = 16384


@triton.jit
def row_scale(amax, QMAX: tl.constexpr):
    """The per-row scale max(amax, 1e-12) / QMAX (fp32 `/`, see the module docstring)."""
    return tl.maximum(amax, 1e-12) / QMAX


@triton.jit
def code_values(x, s, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """fp32 x / s (s broadcast to x) clamped to +-QMAX (int8: rounded half to even), ready for the cast to the
    code dtype: the quotient as RN32(x * RN64(1 / s)), the correctly rounded one (module docstring)."""
    inv = 1.0 / s.to(tl.float64)                                             # fp64, div.rn
    y = (x.to(tl.float64) * inv).to(tl.float32)
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_INT:
        y = (y + 12582912.0) - 12582912.0                # round half to even (1.5 * 2**23)
    return y


@triton.jit
def _quant_rows_one_pass_kernel(x_ptr, q_ptr, s_ptr, M, stride_xm, K: tl.constexpr, QMAX: tl.constexpr,
                                IS_INT: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
                                PDL: tl.constexpr):
    pdl_enter(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)                     # [ROWS]
    offs = tl.arange(0, BLOCK_K)                                             # [BLOCK_K]
    rmask = rows < M
    mask = rmask[:, None] & (offs[None, :] < K)                              # [ROWS, BLOCK_K]
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_xm + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    s = row_scale(tl.max(tl.abs(x), axis=1), QMAX)                           # [ROWS]
    tl.store(s_ptr + rows, s, mask=rmask)
    y = code_values(x, s[:, None], QMAX, IS_INT)
    tl.store(q_ptr + r64[:, None] * K + offs[None, :], y.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, stride_xm, K: tl.constexpr, QMAX: tl.constexpr,
                       IS_INT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    xr = x_ptr + row * stride_xm
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        a = tl.load(xr + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(a))
    s = tl.maximum(tl.max(amax, axis=0), 1e-12) / QMAX
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK):
        mk = k0 + offs < K
        y = tl.math.div_rn(tl.load(xr + k0 + offs, mask=mk, other=0.0).to(tl.float32), s)
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        if IS_INT:
            y = (y + 12582912.0) - 12582912.0            # round half to even (1.5 * 2**23)
        tl.store(q_ptr + row * K + k0 + offs, y.to(q_ptr.dtype.element_ty), mask=mk)


def one_pass_config(m: int, k: int) -> tuple[int, int]:
    """(rows per program, warps) of the one-pass launch for x [M, K <= ONE_PASS_MAX_K]."""
    return 1, min(16, max(4, triton.next_power_of_2(k) // 512))  # H100 sweep: 8 warps at 4096, 16 at 8192+


def quant_rows(x: torch.Tensor, dtype: torch.dtype, qmax: float,
               config: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp16/bf16 -> (codes [M, K] dtype, scale [M, 1] fp32), as `quantize_act_per_token`.
    `config` (rows per program, warps) overrides `one_pass_config` (K <= ONE_PASS_MAX_K only; for sweeps)."""
    m, k = x.shape
    if config is not None:
        rows, warps = config
        if k > ONE_PASS_MAX_K or rows not in (1, 2, 4, 8, 16) or warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"quant_rows config (rows, warps) applies to K <= {ONE_PASS_MAX_K} with rows in "
                             f"1, 2, 4, 8, 16 and warps in 1, 2, 4, 8, 16, 32; got K={k}, config={config}")
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), device=x.device, dtype=dtype)
    s = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    is_int = dtype == torch.int8
    if k <= ONE_PASS_MAX_K:
        rows, warps = config or one_pass_config(m, k)
        _quant_rows_one_pass_kernel[(cdiv(m, rows),)](x, q, s, m, x.stride(0), K=k, QMAX=qmax, IS_INT=is_int,
                                                       BLOCK_K=triton.next_power_of_2(k), ROWS=rows,
                                                       num_warps=warps, **pdl_launch_opts(x))
    else:
        block = min(4096, max(256, triton.next_power_of_2(cdiv(k, 4))))
        _quant_rows_kernel[(m,)](x, q, s, x.stride(0), K=k, QMAX=qmax, IS_INT=is_int, BLOCK=block, num_warps=4,
                                 **pdl_launch_opts(x))
    return q, s


__all__ = ["ONE_PASS_MAX_K", "code_values", "one_pass_config", "quant_rows", "row_scale"]
