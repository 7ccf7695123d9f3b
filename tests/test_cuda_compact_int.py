"""The compact int weight of the W4A16/W8A16 kernels (`pack_int_weight(compact=True)`): scales in 16 bits where
that type holds them exactly, zero points as uint8, no zero array when every zero point is one constant.

Each kernel must give the same bits from the compact weight as from the fp32 one (the scale values are equal,
only their storage differs). Under TRITON_INTERPRET in CI (the Triton kernels); the Gluon ring natively.
"""

from __future__ import annotations

import pytest
import torch

from quantrt.platforms.cuda.kernels import TritonWNA16Kernel
from quantrt.platforms.cuda.kernels.wna16 import compact_scale, pack_int_weight
from quantrt.quant.kernel import LinearSpec
from quantrt.quant.weights import ActScheme, IntWeight
from tests._cuda_env import DEV, NEEDS_TRITON, PLATFORM
from tests.test_cuda_kernels import make_int_weight

pytestmark = NEEDS_TRITON


def _fp16_scales(w: IntWeight) -> IntWeight:
    """The weight with fp32 scales that an fp16 checkpoint (GPTQ, AWQ) gives: every value exact in fp16."""
    return IntWeight(w.codes, w.scale.half().float(), w.bits, w.group_size, zero=w.zero, g_idx=w.g_idx)


def test_compact_scale_takes_the_exact_16_bit_type():
    s = torch.tensor([[0.0123, 1.5], [3.0, 0.25]])
    assert compact_scale(s).dtype is torch.float32                     # 0.0123 is exact in neither
    assert compact_scale(s.half().float()).dtype is torch.float16
    b = torch.tensor([[2.0 ** -30, 1.0]]).bfloat16().float()           # below fp16's range, exact in bf16
    assert compact_scale(b).dtype is torch.bfloat16
    assert torch.equal(compact_scale(b).float(), b)
    assert compact_scale(torch.tensor([[float("nan"), 1.0]])).dtype is torch.float32
    assert compact_scale(torch.tensor([[131072.0]])).dtype is torch.bfloat16     # fp16 overflows; bf16 exact


def test_symmetric_weight_holds_no_zero_array_and_half_the_scale_bytes():
    gen = torch.Generator().manual_seed(0)
    w = _fp16_scales(make_int_weight(64, 256, 4, 64, False, False, gen))
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.bfloat16), PLATFORM)
    assert kern.zero is None and kern.zero_const == 8
    assert kern.scale.dtype is torch.float16 and tuple(kern.scale.shape) == (4, 64)
    _, s32, z32 = pack_int_weight(w, 4, None)                          # the full form (fused MoE keeps it)
    assert s32.dtype is torch.float32 and tuple(z32.shape) == (4, 64)
    held = kern.packed.nbytes + kern.scale.nbytes
    assert held == 256 * 64 // 2 + 4 * 64 * 2                          # 4-bit codes + 16-bit scales, nothing else
    asym = _fp16_scales(make_int_weight(64, 256, 4, 64, True, False, gen))
    ka = TritonWNA16Kernel.prepare(LinearSpec(asym, ActScheme(), torch.bfloat16), PLATFORM)
    assert ka.zero.dtype is torch.uint8 and ka.scale.dtype is torch.float16
    assert torch.equal(ka.zero.t().long(), asym.zero.long())                 # the zero points themselves
    assert ka.packed.nbytes + ka.scale.nbytes + ka.zero.nbytes == 256 * 64 // 2 + 4 * 64 * 3


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_triton_kernels_give_the_same_bits_from_the_compact_weight(asym, bits):
    from quantrt.platforms.cuda.kernels.skinny_wna16 import skinny_wna16
    from quantrt.platforms.cuda.kernels.tc_wna16 import tc_wna16
    from quantrt.platforms.cuda.kernels.wna16_triton import wna16_dequantize, wna16_matmul

    gen = torch.Generator().manual_seed(bits + asym)
    w = _fp16_scales(make_int_weight(64, 256, bits, 128, asym, False, gen))
    p, s, z = pack_int_weight(w, bits, None)
    pc, sc, zc = pack_int_weight(w, bits, None, compact=True)
    zconst = 0 if asym else 1 << (bits - 1)
    assert torch.equal(p, pc) and sc.dtype is torch.float16 and (zc is None if not asym else zc.dtype == torch.uint8)
    x1 = torch.randn(1, 256, generator=gen).to(DEV, torch.bfloat16)
    x4 = torch.randn(4, 256, generator=gen).to(DEV, torch.bfloat16)
    for x in (x1, x4):
        want = wna16_matmul(x, p, s, z, 128, bits)
        assert torch.equal(want, wna16_matmul(x, pc, sc, zc, 128, bits, zero_const=zconst))
    assert torch.equal(wna16_dequantize(p, s, z, 128, bits, torch.bfloat16),
                       wna16_dequantize(pc, sc, zc, 128, bits, torch.bfloat16, zero_const=zconst))
    y = tc_wna16(x4, pc, sc, zc, 128, bits=bits, zero_const=zconst)
    assert torch.equal(tc_wna16(x4, p, s, z, 128, bits=bits), y)
    assert torch.equal(skinny_wna16(x1, p, s, z, 128, bits), skinny_wna16(x1, pc, sc, zc, 128, bits, zero_const=zconst))
    ref = x4.double() @ w.dequantize().double().t()
    assert (y.double() - ref).abs().max() < 2e-2 * ref.abs().max()


def test_a_kernel_without_the_zero_array_asks_for_the_constant():
    from quantrt.platforms.cuda.kernels.tc_wna16 import tc_wna16
    from quantrt.platforms.cuda.kernels.wna16_triton import wna16_dequantize, wna16_matmul

    gen = torch.Generator().manual_seed(3)
    p, s, _ = pack_int_weight(_fp16_scales(make_int_weight(64, 256, 4, 128, False, False, gen)), 4, None, compact=True)
    x = torch.randn(2, 256, generator=gen).to(DEV, torch.bfloat16)
    for call, name in ((lambda: tc_wna16(x, p, s, None, 128), "tc_wna16"),
                       (lambda: wna16_matmul(x, p, s, None, 128, 4), "wna16_matmul"),
                       (lambda: wna16_dequantize(p, s, None, 128, 4, torch.bfloat16), "wna16_dequantize"),
                       (lambda: wna16_matmul(x, p, s, None, 128, 4, offset=True, zero_const=0), "wna16_matmul")):
        with pytest.raises(ValueError, match=rf"{name}: zero is None, so pass zero_const .*2\*\*\(bits-1\)"):
            call()


@pytest.mark.accelerator
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("m", [1, 2, 8, 16, 32])
def test_ring_gives_the_same_bits_from_the_compact_weight(m, asym):
    """Every tile bucket (64 and 128 columns: a uint8 zero box of 64 bytes lands on every other ring row)."""
    from quantrt.platforms.cuda.kernels._common import ring_device_why
    from quantrt.platforms.cuda.kernels.ring_wna16 import ring_wna16

    why = ring_device_why(torch.device(DEV))
    if why:
        pytest.skip(f"the ring kernel cannot run here: {why}")
    gen = torch.Generator().manual_seed(m)
    w = _fp16_scales(make_int_weight(4096, 4096, 4, 128, asym, False, gen))
    p, s, z = pack_int_weight(w, 4, None)
    pc, sc, zc = pack_int_weight(w, 4, None, compact=True)
    x = torch.randn(m, 4096, generator=gen).to(DEV, torch.bfloat16)
    zarg = z if asym else None
    assert torch.equal(ring_wna16(x, p, s, zarg, 128, zero_const=8.0 if not asym else 0.0),
                       ring_wna16(x, pc, sc, zc, 128, zero_const=8.0 if not asym else 0.0))


def test_fused_moe_experts_stack_compact_or_fall_back_to_the_full_form():
    from quantrt.platforms.cuda.kernels.moe import _stack_int

    gen = torch.Generator().manual_seed(5)
    sym = [_fp16_scales(make_int_weight(64, 128, 4, 64, False, False, gen)) for _ in range(2)]
    asym = [_fp16_scales(make_int_weight(64, 128, 4, 64, True, False, gen)) for _ in range(2)]
    (p, s), zc = _stack_int([(w,) for w in sym], torch.device(DEV))
    assert s.dtype is torch.float16 and tuple(s.shape) == (2, 2, 64) and zc == 8.0 and tuple(p.shape) == (2, 16, 64)
    (_, s, z), zc = _stack_int([(w,) for w in asym], torch.device(DEV))
    assert z.dtype is torch.uint8 and zc == 0.0 and torch.equal(z[1].t().long(), asym[1].zero.long())
    (_, s, z), _ = _stack_int([(sym[0],), (asym[0],)], torch.device(DEV))     # zero array and none: full form
    assert z.dtype is torch.float32 and s.dtype is torch.float32
    assert torch.equal(z[0], torch.full_like(z[0], 8.0 + 2**23))
    raw = make_int_weight(64, 128, 4, 64, False, False, gen)                  # fp32 scales beside fp16 ones
    (_, s), zc = _stack_int([(sym[0],), (raw,)], torch.device(DEV))
    assert s.dtype is torch.float32 and torch.equal(s[0].t(), sym[0].scale) and zc == 8.0
