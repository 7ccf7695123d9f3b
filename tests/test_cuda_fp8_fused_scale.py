"""Per-token activation scales for the fp8/int8 W8A8 GEMV and swapped kernel: the one-launch `row_scales`
(one program per row, the whole row in one step) and the in-GEMV amax pass (`SkinnyFp8Config.amax_block`),
vs `quantize_act_per_token` and a float64 reference of the quantize-then-matmul definition (codes and scales
from `quantize_act_per_token`, times the dequantized weight).

The scales involve no fp8 cast, so they are checked bit-exactly under TRITON_INTERPRET=1 too; fp8 GEMV outputs
are compared with the separate-launch path there (the same cast on both sides) and with float64 natively only
(Triton 3.6's interpreter does not round fp32 -> fp8 to nearest).
"""

from __future__ import annotations

import pytest
import torch

from quantrt.quant.quantize import quantize_act_per_token, quantize_fp8
from tests._cuda_env import DEV, NEEDS_TRITON
from tests.test_cuda_kernels import rel_err

pytestmark = NEEDS_TRITON
FP8 = torch.float8_e4m3fn


def _ref64(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """float64 (x quantized per token to fp8, as quantize_act_per_token) @ (codes * per-channel scale)^T."""
    q, s = quantize_act_per_token(x, FP8)
    return (q.double() * s.double()) @ (wq.double() * w_scale.double().reshape(-1, 1)).t()


@pytest.mark.parametrize("k,block,warps", [(1000, None, None), (3000, None, None), (3000, 256, 4), (640, 2048, 8)])
def test_row_scales_match_reference_quantizer(k, block, warps):
    """Whole-row single step (default) and the old multi-step blocks give quantize_act_per_token's scales."""
    from quantrt.platforms.cuda.kernels.skinny_fp8 import row_scales

    x = (torch.randn(5, k, generator=torch.Generator().manual_seed(k)) * 3).to(DEV, torch.bfloat16)
    x[3] = 0                                        # an all-zero row gets the 1e-12 floor, not 0/0
    x[1, k - 1] = -50.0                             # the amax in the last (partial) block
    s = row_scales(x, 448.0, block, warps)
    assert torch.equal(s, quantize_act_per_token(x, FP8)[1].reshape(-1))


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("amax_block", [128, 4096])
def test_skinny_inline_amax_block_equals_launch(m, amax_block):
    """In-GEMV amax in a few wide steps (4096) or many narrow ones (128) == the separate scale launch."""
    from quantrt.platforms.cuda.kernels.skinny_fp8 import SkinnyFp8Config, skinny_fp8

    gen = torch.Generator().manual_seed(m)
    w = quantize_fp8(torch.randn(96, 1100, generator=gen), "channel")        # K not a multiple of any block
    data, ws = w.data.to(DEV), w.scale.to(DEV, torch.float32).reshape(-1).contiguous()
    x = torch.randn(m, 1100, generator=gen).to(DEV, torch.bfloat16)
    x[0, 1099] = 30.0
    inline = skinny_fp8(x, data, ws, 0, 1, 448.0, None, SkinnyFp8Config(32, 128, 2, 4, 1, 2, True, amax_block))
    launch = skinny_fp8(x, data, ws, 0, 1, 448.0, None, SkinnyFp8Config(32, 128, 2, 4, 1, 2, False))
    assert torch.equal(inline, launch)


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("k,n", [(8192, 1024), (14336, 512)])
def test_skinny_fp8_per_token_native(m, k, n):
    """Llama-sized K, the committed configs (inline amax or the launch, by K) vs float64."""
    from quantrt.platforms.cuda.kernels.skinny_fp8 import skinny_fp8

    gen = torch.Generator().manual_seed(m + k)
    w = quantize_fp8(torch.randn(n, k, generator=gen), "channel")
    data, ws = w.data.to(DEV), w.scale.to(DEV, torch.float32).reshape(-1).contiguous()
    x = (torch.randn(m, k, generator=gen) * 3).to(DEV, torch.bfloat16)
    x[0, k - 3] = 60.0
    assert rel_err(skinny_fp8(x, data, ws, 0, 1, 448.0), _ref64(x, data, ws)) < 1e-2


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [2, 16])
def test_swap_fp8_per_token_row_scales_native(m):
    """swap_fp8 per token (scales from the one-step `row_scales`) at K = 14336 vs float64."""
    from quantrt.platforms.cuda.kernels.swap_fp8 import swap_fp8

    gen = torch.Generator().manual_seed(m)
    w = quantize_fp8(torch.randn(1024, 14336, generator=gen), "channel")
    data, ws = w.data.to(DEV), w.scale.to(DEV, torch.float32).reshape(-1).contiguous()
    x = (torch.randn(m, 14336, generator=gen) * 3).to(DEV, torch.bfloat16)
    x[m - 1, 14000] = -70.0
    assert rel_err(swap_fp8(x, data, ws, 0, 1, 448.0), _ref64(x, data, ws)) < 1e-2
