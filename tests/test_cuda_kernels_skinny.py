"""The M <= 16 kernels on K-major layouts (`kmajor_wna16`, `swap_fp8`) vs independent references.

Under TRITON_INTERPRET=1 (CI) at tiny shapes; `-m accelerator` adds Llama-sized shapes natively.
References: the IntWeight / FloatWeight `dequantize()` in fp32 and `fake_quantize_act` for W8A8.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

from quantrt.quant.quantize import fake_quantize_act, quantize_fp8  # noqa: E402
from quantrt.quant.weights import ActKind, ActScheme, IntWeight  # noqa: E402
from tests.test_cuda_kernels import DEV, make_int_weight, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install triton)")


def _km_operands(w: IntWeight):
    from quantrt.platforms.cuda.kernels.kmajor_wna16 import pack_kmajor
    from quantrt.platforms.cuda.kernels.wna16 import _sorted_groups, pack_int_weight

    container = 4 if w.bits <= 4 else 8
    perm, _ = _sorted_groups(w)
    packed, scale, zero = pack_int_weight(w, container, perm)
    return pack_kmajor(packed), scale, zero, container, perm


KM_CASES = [  # bits, group, asym, act_order, m, dtype, (block_n, block_k, waves, warps, stages, dot)
    (4, 128, False, False, 1, torch.float16, (32, 128, 2, 4, 1, True)),
    (4, 64, True, False, 5, torch.float16, (32, 128, 0, 4, 1, True)),      # step spans two groups
    (4, 32, False, True, 1, torch.float16, (32, 128, 2, 4, 1, False)),     # FMA GEMV, act-order
    (4, 256, True, False, 16, torch.bfloat16, (16, 128, 3, 4, 1, True)),   # per-channel, 2-way split
    (8, 128, True, False, 3, torch.float16, (32, 64, 2, 4, 1, True)),      # W8A16
    (8, 256, False, False, 1, torch.float16, (16, 64, 0, 4, 1, False)),
    (3, 64, True, False, 2, torch.float16, (64, 256, 0, 4, 1, True)),      # 3-bit in the 4-bit container
]


@pytest.mark.parametrize("bits,group,asym,act_order,m,dtype,cfg", KM_CASES)
def test_kmajor_wna16(bits, group, asym, act_order, m, dtype, cfg):
    """K-major W4/W8 (tensor cores and FMA GEMV, split-K fixup) vs the fp32 dequantized weight."""
    from quantrt.platforms.cuda.kernels.kmajor_wna16 import KmConfig, km_wna16

    gen = torch.Generator().manual_seed(bits * 31 + group + m)
    n, k = 40, 256  # a partial column tile
    w = make_int_weight(n, k, bits, group, asym, act_order, gen)
    packed, scale, zero, container, perm = _km_operands(w)
    assert packed.shape == (n, k * container // 32)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    ref = x.float() @ w.dequantize().float().t()
    xs = x[:, perm] if perm is not None else x
    for _ in range(2):  # the second call reuses the split-K counters the first one reset
        y = km_wna16(xs, packed, scale, zero, group, container, KmConfig(*cfg))
        # bf16 casts in the interpreter truncate (no round-to-nearest): looser there
        assert y.dtype == dtype and rel_err(y, ref) < (2e-2 if dtype == torch.bfloat16 else 2e-3)


def test_kmajor_wna16_rejects_fma_batches():
    from quantrt.platforms.cuda.kernels.kmajor_wna16 import KmConfig, km_wna16

    gen = torch.Generator().manual_seed(0)
    packed, scale, zero, container, _ = _km_operands(make_int_weight(16, 128, 4, 64, False, False, gen))
    x = torch.randn(2, 128, generator=gen).to(DEV, torch.float16)
    with pytest.raises(ValueError, match="one row"):
        km_wna16(x, packed, scale, zero, 64, container, KmConfig(dot=False))


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


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("bits,group,asym,act_order", [(4, 128, False, False), (4, 128, True, True),
                                                       (4, 32, True, False), (8, 0, False, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kmajor_wna16_native(m, bits, group, asym, act_order, dtype):
    from quantrt.platforms.cuda.kernels.kmajor_wna16 import km_wna16

    gen = torch.Generator().manual_seed(m + bits)
    w = make_int_weight(4096, 4096, bits, group or 4096, asym, act_order, gen)
    packed, scale, zero, container, perm = _km_operands(w)
    x = torch.randn(m, 4096, generator=gen).to(DEV, dtype)
    y = km_wna16(x[:, perm] if perm is not None else x, packed, scale, zero, group or 4096, container)
    assert rel_err(y, x.float() @ w.dequantize().float().t()) < 1e-2


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("gran,kind", SWAP_CASES)
def test_swap_fp8_native(m, gran, kind):
    y, ref = _swap_case(gran, kind, m, 4096, 4096, torch.Generator().manual_seed(m))
    assert rel_err(y, ref) < 2e-2


GEMV_CASES = [  # bits, group, asym, act_order, m, P, (block_n, waves, warps, stages)
    (4, 128, False, False, 1, 32, (16, 2, 4, 1)), (4, 64, True, False, 3, 16, (32, 0, 4, 1)),
    (4, 16, False, True, 4, 32, (16, 4, 4, 1)),    # group < P: scales per element; act-order
    (4, 512, True, False, 2, 64, (16, 2, 4, 1)),   # per-channel
    (8, 128, True, False, 2, 32, (16, 2, 4, 1)), (8, 512, False, False, 1, 64, (16, 0, 4, 1)),
    (3, 64, True, False, 1, 32, (16, 2, 4, 1)),
]


@pytest.mark.parametrize("bits,group,asym,act_order,m,p,cfg", GEMV_CASES)
def test_gemv_wna16(bits, group, asym, act_order, m, p, cfg):
    """Plane-interleaved GEMV (split-K fixup, sym constant zero / asym zero array) vs the dequantized weight."""
    from quantrt.platforms.cuda.kernels.gemv_wna16 import GemvConfig, gemv_wna16, pack_planar
    from quantrt.platforms.cuda.kernels.wna16 import _sorted_groups, pack_int_weight

    gen = torch.Generator().manual_seed(bits * 7 + group + m)
    n, k = 40, 512
    w = make_int_weight(n, k, bits, group, asym, act_order, gen)
    container = 4 if bits <= 4 else 8
    perm, _ = _sorted_groups(w)
    packed, scale, zero = pack_int_weight(w, container, perm)
    planar = pack_planar(packed, container, p)
    x = torch.randn(m, k, generator=gen).to(DEV, torch.float16)
    ref = x.float() @ w.dequantize().float().t()
    xs = x[:, perm] if perm is not None else x
    for _ in range(2):
        y = gemv_wna16(xs, planar, scale, zero if asym else None, group, container, p, GemvConfig(*cfg),
                       zero_const=0 if asym else 1 << (bits - 1))
        assert y.dtype == torch.float16 and rel_err(y, ref) < 2e-3


def test_pack_planar_layout():
    """Slot i of word j in block b holds k = b*8*P + i*P + j (codes u(k) = (7k // 5) mod 16)."""
    from quantrt.platforms.cuda.kernels.gemv_wna16 import pack_planar, plane_words
    from quantrt.platforms.cuda.kernels.wna16 import pack_int_weight

    k, p = 256, 16
    u = (torch.arange(k) * 7 // 5) % 16
    codes = (u - 8).to(torch.int8).repeat(3, 1)                                         # [N=3, K]
    w = IntWeight(codes, torch.ones(3, 1), 4, k)
    planar = pack_planar(pack_int_weight(w, 4, None)[0], 4, p)                          # [3, K/8]
    word = int(planar[1, 16 + 5]) & 0xFFFFFFFF                                          # block 1, j = 5
    assert [(word >> (4 * i)) & 15 for i in range(8)] == [int(u[128 + i * p + 5]) for i in range(8)]
    assert plane_words(4096, 4) == 128 and plane_words(11008, 4) == 32 and plane_words(100, 4) == 0


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("bits,group,asym,act_order", [(4, 128, False, False), (4, 128, True, True),
                                                       (4, 32, True, False), (8, 0, False, False)])
def test_gemv_wna16_native(m, bits, group, asym, act_order):
    from quantrt.platforms.cuda.kernels.gemv_wna16 import gemv_wna16, pack_planar, plane_words
    from quantrt.platforms.cuda.kernels.wna16 import _sorted_groups, pack_int_weight

    gen = torch.Generator().manual_seed(m + bits)
    k = 4096
    w = make_int_weight(4096, k, bits, group or k, asym, act_order, gen)
    container = 4 if bits <= 4 else 8
    perm, _ = _sorted_groups(w)
    packed, scale, zero = pack_int_weight(w, container, perm)
    p = plane_words(k, container)
    x = torch.randn(m, k, generator=gen).to(DEV, torch.bfloat16)
    y = gemv_wna16(x[:, perm] if perm is not None else x, pack_planar(packed, container, p), scale,
                   zero if asym else None, group or k, container, p, zero_const=0 if asym else 1 << (bits - 1))
    assert rel_err(y, x.float() @ w.dequantize().float().t()) < 1e-2


@pytest.mark.parametrize("dtype,qmax", [(torch.int8, 127.0), (torch.float8_e4m3fn, 448.0)])
def test_quant_rows_matches_reference_quantizer(dtype, qmax):
    """The one-launch per-token quantizer in front of `_scaled_mm` is bit-exact vs quantize_act_per_token."""
    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows
    from quantrt.quant.quantize import quantize_act_per_token

    if DEV == "cpu" and dtype != torch.int8:
        pytest.skip("Triton 3.6's interpreter rounds fp32->fp8 without carrying into the exponent")
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 1000, generator=gen) * 3).to(DEV, torch.bfloat16)
    x[2] = 0  # an all-zero row gets the 1e-12 floor, not 0/0
    q, s = quant_rows(x, dtype, qmax)
    q_ref, s_ref = quantize_act_per_token(x, dtype)
    assert torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float())


@pytest.mark.parametrize("m", [2, 16])
def test_w8a8_small_batches_take_the_swapped_kernel(m):
    """TritonW8A8Kernel.apply at 2 <= M <= 16 with quantized activations (swap_fp8) vs the reference kernel."""
    from quantrt.platform.interface import DeviceCapability
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.platforms.cuda.kernels.w8a8 import SWAP_MAX_M
    from quantrt.platforms.cuda.platform import CudaPlatform
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.kernels.reference import ReferenceLinearKernel

    assert m <= SWAP_MAX_M
    platform = CudaPlatform(capability=DeviceCapability(9, 0), device_name="test")
    gen = torch.Generator().manual_seed(m)
    codes = torch.randint(-127, 128, (96, 256), generator=gen).to(torch.int8)
    w = IntWeight(codes.to(DEV), (torch.rand(96, 1, generator=gen) * 0.01).to(DEV), 8, 256)
    spec = LinearSpec(w, ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8), torch.float16)
    x = torch.randn(m, 256, generator=gen).to(DEV, torch.float16)
    y = TritonW8A8Kernel.prepare(spec, platform).apply(x, None)
    assert rel_err(y, ReferenceLinearKernel.prepare(spec, platform).apply(x, None)) < 2e-3
