"""The M <= 16 W8A8 paths (`swap_fp8`, the in-kernel amax of `skinny_fp8`, `act_quant_triton`) vs references.

Under TRITON_INTERPRET=1 (CI) at tiny shapes; `-m accelerator` adds Llama-sized shapes natively.
References: the IntWeight / FloatWeight `dequantize()` in fp32 and `fake_quantize_act` for W8A8.
"""

from __future__ import annotations

import pytest
import torch

from quantrt.quant.quantize import fake_quantize_act, quantize_fp8
from quantrt.quant.weights import ActKind, ActScheme, IntWeight
from tests._cuda_env import DEV, NEEDS_TRITON
from tests.test_cuda_kernels import rel_err

pytestmark = NEEDS_TRITON


SWAP_CASES = [("tensor", ActKind.NONE), ("channel", ActKind.NONE), ("block", ActKind.NONE),
              ("channel", ActKind.DYNAMIC_TOKEN), ("block", ActKind.DYNAMIC_GROUP),
              ("tensor", ActKind.STATIC_TENSOR)]


def _swap_case(gran: str, kind: ActKind, m: int, n: int, k: int, gen: torch.Generator, cfg=None):
    from quantrt.platforms.cuda.kernels.swap_fp8 import SwapFp8Config, swap_fp8

    fp8 = torch.float8_e4m3fn
    w = quantize_fp8(torch.randn(n, k, generator=gen), gran, (128, 128) if gran == "block" else None)
    act = (ActScheme() if kind is ActKind.NONE else ActScheme(kind, fp8, group=128) if kind is ActKind.DYNAMIC_GROUP
           else ActScheme(kind, fp8, scale=torch.tensor(0.02)) if kind is ActKind.STATIC_TENSOR else ActScheme(kind, fp8))
    x = torch.randn(m, k, generator=gen).to(DEV, torch.bfloat16)
    ref = fake_quantize_act(x, act) @ w.dequantize().to(DEV).float().t()
    code = {ActKind.DYNAMIC_TOKEN: 0, ActKind.DYNAMIC_GROUP: 1, ActKind.STATIC_TENSOR: 2, ActKind.NONE: 3}[kind]
    ws = w.scale.to(DEV, torch.float32)
    ws = ws.reshape(-1).contiguous() if ws.dim() < 2 or gran != "block" else ws.contiguous()
    sa = act.scale.to(DEV, torch.float32).reshape(1) if act.scale is not None else None
    y = swap_fp8(x, w.data.to(DEV), ws, code, {"tensor": 0, "channel": 1, "block": 2}[gran],
                 448.0 if code != 3 else 1.0, sa, SwapFp8Config(*cfg) if cfg else None)
    return y, ref


@pytest.mark.parametrize("gran,kind", SWAP_CASES)
@pytest.mark.parametrize("m,cfg", [(1, (32, 64, 2, 4, 1)), (7, (64, 128, 0, 4, 1))])
def test_swap_fp8(gran, kind, m, cfg):
    if DEV == "cpu" and kind is not ActKind.NONE:
        pytest.skip("Triton 3.6's interpreter rounds fp32->fp8 without carrying into the exponent; "
                    "these cases run natively with -m accelerator")
    gen = torch.Generator().manual_seed(m)
    y, ref = _swap_case(gran, kind, m, 160, 320, gen, cfg)  # partial 128-blocks along N and K
    assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("m", [1, 5, 16])
def test_swap_int8_per_token(m):
    """int8 W8A8 per channel x per token through the swapped kernel (row scales from the small launch)."""
    from quantrt.platforms.cuda.kernels.swap_fp8 import SwapFp8Config, swap_fp8

    gen = torch.Generator().manual_seed(m)
    codes = torch.randint(-127, 128, (96, 256), generator=gen).to(torch.int8)
    w = IntWeight(codes.to(DEV), (torch.rand(96, 1, generator=gen) * 0.01).to(DEV), 8, 256)
    x = torch.randn(m, 256, generator=gen).to(DEV, torch.float16)
    y = swap_fp8(x, w.codes, w.scale.reshape(-1).contiguous(), 0, 1, 127.0, None, SwapFp8Config(32, 64, 2, 4, 1))
    ref = fake_quantize_act(x, ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8)) @ w.dequantize().float().t()
    assert rel_err(y, ref) < 2e-3


@pytest.mark.parametrize("m,cfg", [(40, (32, 128, 2, 4, 1, 32)), (70, (64, 64, 0, 4, 1, 16))])
def test_swap_int8_row_tiles(m, cfg):
    """M = 17..256: BM-row tiles (ragged last tile; split-K counters per (m, n) tile) vs fake-quant x @ W."""
    from quantrt.platforms.cuda.kernels.swap_fp8 import SwapFp8Config, swap_fp8

    gen = torch.Generator().manual_seed(m)
    codes = torch.randint(-127, 128, (96, 256), generator=gen).to(torch.int8)
    w = IntWeight(codes.to(DEV), (torch.rand(96, 1, generator=gen) * 0.01).to(DEV), 8, 256)
    x = torch.randn(m, 256, generator=gen).to(DEV, torch.float16)
    y = swap_fp8(x, w.codes, w.scale.reshape(-1).contiguous(), 0, 1, 127.0, None, SwapFp8Config(*cfg))
    ref = fake_quantize_act(x, ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8)) @ w.dequantize().float().t()
    assert rel_err(y, ref) < 2e-3


@pytest.mark.parametrize("gran", ["channel", "block"])
def test_swap_fp8_weight_only_row_tiles(gran):
    y, ref = _swap_case(gran, ActKind.NONE, 37, 160, 256, torch.Generator().manual_seed(3), (64, 128, 2, 4, 1, 16))
    assert rel_err(y, ref) < 1e-2


def test_swap_fp8_row_limits():
    from quantrt.platforms.cuda.kernels.swap_fp8 import default_config, m_bucket, swap_fp8

    assert [m_bucket(m) for m in (1, 16, 17, 33, 129, 256)] == [16, 16, 32, 64, 256, 256]
    assert default_config(100, 4096, 4096, 0).block_m >= 32 and default_config(8, 4096, 4096, 0).block_m == 16
    x = torch.zeros(257, 128, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="1 <= M <= 256"):
        swap_fp8(x, torch.zeros(32, 128, dtype=torch.int8, device=DEV), torch.ones(32, device=DEV), 0, 1, 127.0)


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [17, 64, 200])
@pytest.mark.parametrize("gran,kind", SWAP_CASES)
def test_swap_fp8_row_tiles_native(m, gran, kind):
    y, ref = _swap_case(gran, kind, m, 4096, 4096, torch.Generator().manual_seed(m))
    assert rel_err(y, ref) < 2e-2


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("gran,kind", SWAP_CASES)
def test_swap_fp8_native(m, gran, kind):
    y, ref = _swap_case(gran, kind, m, 4096, 4096, torch.Generator().manual_seed(m))
    assert rel_err(y, ref) < 2e-2


@pytest.mark.parametrize("m,k,config", [(6, 1000, None), (5, 96, None), (7, 96, (4, 1)), (3, 14336, None),
                                         (5, 14336, (2, 8)), (3, 16500, None)])
@pytest.mark.parametrize("dtype,qmax", [(torch.int8, 127.0), (torch.float8_e4m3fn, 448.0)])
def test_quant_rows_matches_reference_quantizer(dtype, qmax, m, k, config):
    """The one-launch per-token quantizer in front of `_scaled_mm` is bit-exact vs quantize_act_per_token: the
    one-pass launch (K <= 16384, odd K, several rows per program with a partial last one) and the two-pass loop
    (K = 16500)."""
    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows
    from quantrt.quant.quantize import quantize_act_per_token

    if DEV == "cpu" and dtype != torch.int8:
        pytest.skip("Triton 3.6's interpreter rounds fp32->fp8 without carrying into the exponent")
    gen = torch.Generator().manual_seed(k + m)
    x = (torch.randn(m, k, generator=gen) * 3).to(DEV, torch.bfloat16)
    x[2] = 0  # an all-zero row gets the 1e-12 floor, not 0/0
    x[0, k // 3] = 300.0  # one outlier sets row 0's scale
    q, s = quant_rows(x, dtype, qmax, config)
    q_ref, s_ref = quantize_act_per_token(x, dtype)
    assert torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float())


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [17, 64, 512])
@pytest.mark.parametrize("k", [4096, 14336, 28672])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_quant_rows_llama_shapes_native(m, k, dtype):
    """Llama-sized rows (one-pass launch up to K = 16384, two-pass above) bit-exact vs quantize_act_per_token."""
    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows
    from quantrt.quant.quantize import quantize_act_per_token

    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(DEV, torch.bfloat16)
    x[:, ::997] *= 50
    q, s = quant_rows(x, dtype, 127.0 if dtype == torch.int8 else 448.0)
    q_ref, s_ref = quantize_act_per_token(x, dtype)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.accelerator
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_quant_rows_every_bf16_amax_native(dtype):
    """One row per positive finite bf16 value as its amax (subnormals and the 1e-12 floor included): scales
    and codes bit-exact vs quantize_act_per_token."""
    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows
    from quantrt.quant.quantize import quantize_act_per_token

    amax = torch.arange(1, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(DEV)  # [32639]
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(amax.numel(), 96, generator=gen) * 2 - 1).to(DEV) * amax.float()[:, None]
    x = x.to(torch.bfloat16)
    x[:, 7] = amax
    q, s = quant_rows(x, dtype, 127.0 if dtype == torch.int8 else 448.0)
    q_ref, s_ref = quantize_act_per_token(x, dtype)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_quant_rows_config_rejections():
    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows

    with pytest.raises(ValueError, match="K <= 16384 with rows in 1, 2, 4, 8, 16"):
        quant_rows(torch.zeros(2, 16500, dtype=torch.bfloat16, device=DEV), torch.int8, 127.0, (1, 4))
    with pytest.raises(ValueError, match="got K=64, config=\\(3, 4\\)"):
        quant_rows(torch.zeros(2, 64, dtype=torch.bfloat16, device=DEV), torch.int8, 127.0, (3, 4))


@pytest.mark.parametrize("m", [2, 16, 48])
def test_w8a8_small_batches_take_the_swapped_kernel(m):
    """TritonW8A8Kernel.apply at 2 <= M <= 256 with quantized activations (swap_fp8) vs the reference kernel."""
    from quantrt.platform.interface import DeviceCapability
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.platforms.cuda.kernels.w8a8 import ROW_TILE_MAX_M, SWAP_MAX_M
    from quantrt.platforms.cuda.platform import CudaPlatform
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.kernels.reference import ReferenceLinearKernel

    assert m <= SWAP_MAX_M or m <= ROW_TILE_MAX_M
    platform = CudaPlatform(capability=DeviceCapability(9, 0), device_name="test")
    gen = torch.Generator().manual_seed(m)
    codes = torch.randint(-127, 128, (96, 256), generator=gen).to(torch.int8)
    w = IntWeight(codes.to(DEV), (torch.rand(96, 1, generator=gen) * 0.01).to(DEV), 8, 256)
    spec = LinearSpec(w, ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8), torch.float16)
    x = torch.randn(m, 256, generator=gen).to(DEV, torch.float16)
    y = TritonW8A8Kernel.prepare(spec, platform).apply(x, None)
    assert rel_err(y, ReferenceLinearKernel.prepare(spec, platform).apply(x, None)) < 2e-3


@pytest.mark.parametrize("m,static", [(64, False), (97, True)])
def test_int8_w8a8_large_batch_takes_int_mm(m, static, monkeypatch):
    """M >= INT_MM_MIN_M: one-launch int8 codes, cuBLASLt int8 GEMM, row x column scale epilogue vs the
    reference kernel (fake-quantized activations @ dequantized weights)."""
    from quantrt.platform.interface import DeviceCapability
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.platforms.cuda.kernels import int8_mm as int8_mod
    from quantrt.platforms.cuda.kernels.w8a8 import INT_MM_MIN_M
    from quantrt.platforms.cuda.platform import CudaPlatform
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.kernels.reference import ReferenceLinearKernel

    assert m >= INT_MM_MIN_M
    calls = []
    real = int8_mod.int8_mm
    monkeypatch.setattr(int8_mod, "int8_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    platform = CudaPlatform(capability=DeviceCapability(9, 0), device_name="test")
    gen = torch.Generator().manual_seed(m)
    codes = torch.randint(-127, 128, (96, 256), generator=gen).to(torch.int8)
    w = IntWeight(codes.to(DEV), (torch.rand(96, 1, generator=gen) * 0.01).to(DEV), 8, 256)
    act = (ActScheme(ActKind.STATIC_TENSOR, torch.int8, scale=torch.tensor(0.03)) if static
           else ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8))
    spec = LinearSpec(w, act, torch.float16)
    x = torch.randn(m, 256, generator=gen).to(DEV, torch.float16)
    y = TritonW8A8Kernel.prepare(spec, platform).apply(x, None)
    assert calls == [1]
    assert rel_err(y, ReferenceLinearKernel.prepare(spec, platform).apply(x, None)) < 2e-3


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [64, 200])
def test_block_fp8_large_batch_native(m):
    """M >= 64, 128x128 fp8 blocks x 128-group fp8 activations: one-launch group quantizer (codes and scales
    bit-exact vs quantize_act_per_token_group) + cuBLASLt blockwise, vs the fake-quant reference."""
    from quantrt.platforms.cuda.kernels.block_fp8_mm import quant_groups
    from quantrt.quant.quantize import quantize_act_per_token_group

    fp8 = torch.float8_e4m3fn
    x = (torch.randn(m, 4096, generator=torch.Generator().manual_seed(m)) * 3).to(DEV, torch.bfloat16)
    q, s = quant_groups(x, fp8, 448.0)
    q_ref, s_ref = quantize_act_per_token_group(x, fp8, 128)
    assert torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float())
    from quantrt.platform.interface import DeviceCapability
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.platforms.cuda.platform import CudaPlatform
    from quantrt.quant.kernel import LinearSpec

    w = quantize_fp8(torch.randn(512, 4096, generator=torch.Generator().manual_seed(1)), "block", (128, 128))
    w = type(w)(w.data.to(DEV), w.scale.to(DEV), w.granularity, w.block)
    act = ActScheme(ActKind.DYNAMIC_GROUP, fp8, group=128)
    kern = TritonW8A8Kernel.prepare(LinearSpec(w, act, torch.bfloat16),
                                    CudaPlatform(capability=DeviceCapability(9, 0), device_name="test"))
    assert kern.use_block_mm
    ref = fake_quantize_act(x, act) @ w.dequantize().float().t()
    assert rel_err(kern.apply(x, None), ref) < 1e-2


def test_int8_mm_rejects_bad_shapes():
    from quantrt.platforms.cuda.kernels.int8_mm import int8_mm

    w = torch.zeros(96, 256, dtype=torch.int8, device=DEV)
    with pytest.raises(ValueError, match="M >= 17"):
        int8_mm(torch.zeros(8, 256, dtype=torch.int8, device=DEV), torch.ones(8, 1, device=DEV), w,
                torch.ones(96, device=DEV), torch.float16)
    with pytest.raises(ValueError, match="int8 codes and weights.*weight torch.float32"):
        int8_mm(torch.zeros(32, 256, dtype=torch.int8, device=DEV), torch.ones(32, 1, device=DEV), w.float(),
                torch.ones(96, device=DEV), torch.float16)


@pytest.mark.parametrize("m", [1, 3])
def test_skinny_fp8_inline_amax(m):
    """Per-token fp8 GEMV with the row amax found in every program (ACT 4) == the separate scale launch;
    natively also vs fake-quantized activations (the interpreter's fp8 cast is not round-to-nearest)."""
    from quantrt.platforms.cuda.kernels.skinny_fp8 import SkinnyFp8Config, default_config, skinny_fp8

    assert default_config(1, 8192, 8192, 0).inline_amax and default_config(1, 4096, 14336, 0).inline_amax
    gen = torch.Generator().manual_seed(m)
    w = quantize_fp8(torch.randn(96, 640, generator=gen), "channel")
    data, ws = w.data.to(DEV), w.scale.to(DEV, torch.float32).reshape(-1).contiguous()
    x = torch.randn(m, 640, generator=gen).to(DEV, torch.bfloat16)
    inline = skinny_fp8(x, data, ws, 0, 1, 448.0, None, SkinnyFp8Config(32, 128, 2, 4, 1, 2, True))
    launch = skinny_fp8(x, data, ws, 0, 1, 448.0, None, SkinnyFp8Config(32, 128, 2, 4, 1, 2, False))
    assert torch.equal(inline, launch)
    if DEV == "cuda":
        ref = fake_quantize_act(x, ActScheme(ActKind.DYNAMIC_TOKEN, torch.float8_e4m3fn)) @ w.dequantize().to(DEV).t()
        assert rel_err(inline, ref) < 1e-2
