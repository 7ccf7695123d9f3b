"""`codes_mm` (split-K fp8 GEMM on per-token codes) vs float64, its tile rule, and the W8A8 dispatch at
M = 64. Under TRITON_INTERPRET=1 (CI) at tiny shapes; `-m accelerator` runs the Llama shapes natively
against cuBLASLt `_scaled_mm` on the same codes."""

from __future__ import annotations

import pytest
import torch

from tests._cuda_env import DEV, NEEDS_TRITON

pytestmark = NEEDS_TRITON
FP8 = torch.float8_e4m3fn


def _operands(m: int, k: int, n: int, channel: bool, seed: int, dtype: torch.dtype = FP8):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        a = torch.randint(-127, 128, (m, k), generator=g).to(torch.int8)
        w = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
    else:
        a = (torch.randn(m, k, generator=g) * 60).clamp(-448, 448).to(FP8)
        w = (torch.randn(n, k, generator=g) * 60).clamp(-448, 448).to(FP8)
    sa = torch.rand(m, 1, generator=g) * 0.01 + 1e-4
    sw = torch.rand(n if channel else 1, generator=g) * 0.01 + 1e-4
    ref = (a.double() * sa.double()) @ (w.double() * sw.double().reshape(-1, 1)).t()    # [M, N] float64
    return [t.to(DEV) for t in (a, sa, w, sw)], ref


@pytest.mark.parametrize("m,k,n,cfg,channel", [
    (40, 320, 96, (32, 32, 64, 2, 4, 2), True),     # 2 row tiles (the second masked), ragged K split
    (64, 256, 80, (64, 64, 128, 0, 4, 2), False),   # no split, N masked, per-tensor weight scale
    (7, 512, 64, (16, 16, 64, 8, 4, 3), True),      # many splits, each last-arriver reduce
])
def test_codes_mm_matches_float64(m, k, n, cfg, channel) -> None:
    from quantrt.platforms.cuda.kernels.codes_mm import CodesConfig, codes_mm

    (a, sa, w, sw), ref = _operands(m, k, n, channel, m + k)
    y = codes_mm(a, sa, w, sw, torch.bfloat16, CodesConfig(*cfg))
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    err = (y.double().cpu() - ref).abs().max() / ref.abs().max()
    assert err < 8e-3, err                       # bf16 output rounding; fp32 accumulation of exact products
    again = codes_mm(a, sa, w, sw, torch.bfloat16, CodesConfig(*cfg))
    assert torch.equal(again, y)                 # the split counters were reset by the launch before


def test_codes_mm_rejects_mismatched_operands() -> None:
    from quantrt.platforms.cuda.kernels.codes_mm import codes_mm

    (a, sa, w, sw), _ = _operands(4, 64, 32, True, 0)
    with pytest.raises(ValueError, match=r"K-contiguous a \[M, K\] and w \[N, K\] of one 8-bit dtype \(fp8 or "
                                         r"int8\); got a \(4, 64\) torch.float8_e4m3fn, w \(32, 32\)"):
        codes_mm(a, sa, w[:, :32], sw, torch.bfloat16)
    with pytest.raises(ValueError, match="torch.float8_e5m2"):
        codes_mm(a, sa, w.to(torch.float8_e5m2), sw, torch.bfloat16)
    with pytest.raises(ValueError, match="w \\(32, 64\\) torch.int8"):
        codes_mm(a, sa, w.float().to(torch.int8), sw, torch.bfloat16)
    with pytest.raises(ValueError, match=r"sa with M=4 scales and sw with 1 or N=32; got sa \(3, 1\)"):
        codes_mm(a, sa[:3], w, sw, torch.bfloat16)


def test_tile_rule() -> None:
    from quantrt.platforms.cuda.kernels.codes_mm import MAX_M, MIN_M, tile_for

    assert (MIN_M, MAX_M) == (9, 256)
    assert tile_for(64, 14336, 4096).block_n == 32 and tile_for(48, 14336, 4096) == tile_for(64, 14336, 4096)
    assert tile_for(32, 4096, 4096).block_m == 32 and tile_for(17, 4096, 4096) == tile_for(32, 4096, 4096)
    assert tile_for(16, 4096, 28672).block_m == 16
    assert tile_for(16, 8192, 8192) is None       # within 2% of swap_fp8: not taken
    assert tile_for(8, 14336, 4096) is None and tile_for(65, 14336, 4096) is None   # unmeasured / cuBLASLt
    assert tile_for(64, 4096, 4097) is None
    assert tile_for(17, 8192, 8192, is_int=True).block_n == 32 and tile_for(16, 8192, 8192, is_int=True) is None
    assert tile_for(200, 4096, 28672, is_int=True).block_n == 256              # bucket 256
    assert tile_for(128, 8192, 8192, is_int=True) is None                      # within 3%: cuBLASLt int8 stays


@pytest.mark.accelerator
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,k,n", [(64, 14336, 4096), (40, 4096, 28672), (64, 4096, 4096), (32, 8192, 8192),
                                   (12, 4096, 6144)])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_dispatch_matches_scaled_mm(m, k, n, static) -> None:
    """TritonW8A8Kernel at M = 9..64 takes fp8_codes_mm on these shapes; its output equals cuBLASLt's on the
    same codes up to fp32 summation order."""
    from quantrt.platforms.cuda.kernels.codes_mm import tile_for
    from quantrt.platforms.cuda.kernels.w8a8 import TritonW8A8Kernel
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.quantize import quantize_fp8
    from quantrt.quant.weights import ActKind, ActScheme
    from tests._cuda_env import PLATFORM

    g = torch.Generator().manual_seed(k + n)
    w = quantize_fp8(torch.randn(n, k, generator=g) * 0.02, "channel", None)
    w = type(w)(w.data.cuda(), w.scale.cuda(), w.granularity, w.block)
    act = (ActScheme(ActKind.STATIC_TENSOR, FP8, scale=torch.tensor(0.01)) if static
           else ActScheme(ActKind.DYNAMIC_TOKEN, FP8))
    kern = TritonW8A8Kernel.prepare(LinearSpec(w, act, torch.bfloat16), PLATFORM)
    assert tile_for(m, k, n) is not None
    x = torch.randn(m, k, generator=g).cuda().to(torch.bfloat16)
    y = kern.apply(x, None)
    if static:
        sa = kern.act_scale.reshape(1, 1).expand(m, 1).contiguous()
        xq = (x.float() / sa).clamp(-448, 448).to(FP8)
    else:
        from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows

        xq, sa = quant_rows(x, FP8, 448.0)
    ref = torch._scaled_mm(xq, kern.data.t(), scale_a=sa, scale_b=kern._sb, out_dtype=torch.float32)
    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    assert err < 8e-3, err
