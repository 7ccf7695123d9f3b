"""The pipelined variants of the batch 2-16 tensor-core linears vs float64 references.

`tc_wna16` with the next K step's words prefetched into registers (`TcConfig.prefetch`) or loaded through a
TMA descriptor (`TcConfig.tma`), and `swap_fp8` with TMA weight tiles (`SwapFp8Config.tma`). Under
TRITON_INTERPRET=1 at tiny shapes (ragged N and K tails, split-K); `-m accelerator` adds Llama-sized shapes
natively. References: x @ the dequantized weight in float64 (fake-quantized activations for W8A8).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

from quantrt.quant.kernel import LinearSpec  # noqa: E402
from quantrt.quant.quantize import fake_quantize_act, quantize_fp8  # noqa: E402
from quantrt.quant.weights import ActKind, ActScheme  # noqa: E402
from tests.test_cuda_kernels import DEV, PLATFORM, TritonWNA16Kernel, make_int_weight, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install triton)")


def _wna16(m: int, n: int, k: int, bits: int, group: int, dtype: torch.dtype, cfg, seed: int):
    from quantrt.platforms.cuda.kernels.tc_wna16 import TcConfig, tc_wna16

    gen = torch.Generator().manual_seed(seed)
    w = make_int_weight(n, k, bits, group, True, False, gen)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), dtype), PLATFORM)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    y = tc_wna16(x, kern.packed, kern.scale, kern.zero, group, TcConfig(*cfg) if cfg else None, bits=bits)
    ref = x.double() @ w.dequantize().to(DEV).double().t()
    return y, ref


# TcConfig(block_n, block_k, split_k, num_warps, num_stages, waves, swap, block_m, prefetch, tma)
@pytest.mark.parametrize("m,bits,cfg", [
    (3, 4, (64, 128, 3, 4, 1, 4, True, 16, True, False)),    # prefetch, 3 ragged splits of K = 640
    (6, 4, (64, 128, 2, 4, 1, 4, True, 16, 2, False)),       # two steps prefetched, splits of 3 and 2 steps
    (16, 4, (64, 128, 2, 4, 1, 4, True, 16, False, True)),   # TMA words, N tail zero-filled
    (5, 8, (64, 128, 3, 4, 1, 4, True, 16, True, False)),    # 8-bit container with prefetch
    (4, 4, (64, 64, 0, 4, 1, 4, True, 16, 2, False, True)),  # fragment order (K permuted), 2 steps prefetched
    (9, 4, (32, 64, 0, 4, 1, 4, False, 16, False, True)),    # unswapped dot, TMA, split by waves
])
def test_tc_wna16_pipelined(m, bits, cfg):
    y, ref = _wna16(m, 96, 640, bits, 128 if cfg[1] == 128 else 64, torch.float16, cfg, m)
    assert rel_err(y, ref) < 2e-3


def _swap(m: int, n: int, k: int, kind: ActKind, cfg, seed: int):
    from quantrt.platforms.cuda.kernels.swap_fp8 import SwapFp8Config, swap_fp8

    fp8 = torch.float8_e4m3fn
    gen = torch.Generator().manual_seed(seed)
    w = quantize_fp8(torch.randn(n, k, generator=gen), "channel", None)
    act = ActScheme() if kind is ActKind.NONE else ActScheme(kind, fp8)
    x = torch.randn(m, k, generator=gen).to(DEV, torch.bfloat16)
    ref = fake_quantize_act(x, act).double() @ w.dequantize().to(DEV).double().t()
    code = 3 if kind is ActKind.NONE else 0
    y = swap_fp8(x, w.data.to(DEV), w.scale.to(DEV, torch.float32).reshape(-1).contiguous(), code, 1,
                 1.0 if code == 3 else 448.0, None, SwapFp8Config(*cfg) if cfg else None)
    return y, ref


# SwapFp8Config(block_n, block_k, waves, num_warps, num_stages, block_m, tma)
@pytest.mark.parametrize("m,cfg", [(2, (64, 128, 2, 4, 1, 16, True)), (11, (32, 64, 0, 4, 1, 16, True))])
def test_swap_fp8_tma_weight_only(m, cfg):
    """fp8 weight-only (no fp8 activation codes, so it runs under the interpreter) with TMA weight tiles;
    N = 160 and K = 320 leave partial boxes that the descriptor zero-fills."""
    y, ref = _swap(m, 160, 320, ActKind.NONE, cfg, m)
    assert rel_err(y, ref) < 1e-2


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [2, 7, 16])
@pytest.mark.parametrize("cfg", [(64, 256, 1, 4, 4, 16, True), (64, 128, 2, 4, 6, 16, True)])
@pytest.mark.parametrize("kind", [ActKind.DYNAMIC_TOKEN, ActKind.NONE])
def test_swap_fp8_tma_native(m, cfg, kind):
    y, ref = _swap(m, 4096, 8192, kind, cfg, m)
    assert rel_err(y, ref) < 1e-2


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [2, 9, 16])
@pytest.mark.parametrize("cfg", [(64, 128, 0, 4, 3, 4, True, 16, 1, False), (64, 128, 0, 4, 3, 4, True, 16, 2, False),
                                 (64, 128, 0, 4, 4, 4, True, 16, 0, True), None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tc_wna16_pipelined_native(m, cfg, dtype):
    y, ref = _wna16(m, 4096, 8192, 4, 128, dtype, cfg, m)
    assert rel_err(y, ref) < 1e-2


def test_tc_wna16_frag_order_matches_gluon_permutation():
    """The fragment-order K permutation is a bijection of each step, the same in the Triton (`frag`, the
    CPU-tested twin) and the Gluon kernel, and pairs (kappa, kappa + 1) are codes (i, i + 4) of one word."""
    import inspect
    import re

    from quantrt.platforms.cuda.kernels import tc_wna16, tc_wna16_gluon

    def body(fn):  # the statements, without the decorator, signature and docstring
        src = inspect.getsource(getattr(fn, "fn", fn)).splitlines()
        return [ln.strip() for ln in src if re.match(r"\s+(\w+ = |return )", ln)]

    assert body(tc_wna16._frag_k) == body(tc_wna16_gluon._frag_k) and len(body(tc_wna16._frag_k)) == 7
    kappa = torch.arange(128)
    k = (32 * (kappa >> 5) + 16 * ((kappa >> 2) & 1) + 8 * ((kappa >> 1) & 1) + 4 * (kappa & 1)
         + 2 * ((kappa >> 4) & 1) + ((kappa >> 3) & 1))
    assert sorted(k.tolist()) == list(range(128))
    assert torch.equal(k[1::2] - k[0::2], torch.full((64,), 4)) and torch.equal(k[0::2] // 8, k[1::2] // 8)


def test_tc_wna16_gluon_rejects_bad_inputs():
    from quantrt.platforms.cuda.kernels.tc_wna16_gluon import GluonTcConfig, can_run, tc_wna16_gluon

    assert can_run(16, 4096, 128, 4, torch.bfloat16) and not can_run(17, 4096, 128, 4, torch.bfloat16)
    assert not can_run(2, 4096, 128, 8, torch.bfloat16) and not can_run(2, 4096, 64, 4, torch.float16)
    assert not can_run(2, 4096, 128, 4, torch.float32)
    x = torch.zeros(20, 512, dtype=torch.bfloat16)
    p = torch.zeros(64, 96, dtype=torch.int32)
    s = torch.zeros(4, 96)
    with pytest.raises(ValueError, match="M=20"):
        tc_wna16_gluon(x, p, s, s, 128)
    with pytest.raises(ValueError, match="block_n 64/128"):
        tc_wna16_gluon(x[:4], p, s, s, 128, GluonTcConfig(block_n=32))


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [1, 2, 9, 16])
@pytest.mark.parametrize("cfg", [(64, 128, 4, 0), (128, 128, 2, 0), (64, 64, 4, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tc_wna16_gluon_native(m, cfg, dtype):
    """Gluon fragment-order W4A16 (N = 4160: a partial column tile; split-K ragged) vs float64."""
    from quantrt.platforms.cuda.kernels.tc_wna16_gluon import GluonTcConfig, tc_wna16_gluon

    gen = torch.Generator().manual_seed(m)
    w = make_int_weight(4160, 8192, 4, 128, True, False, gen)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), dtype), PLATFORM)
    x = torch.randn(m, 8192, generator=gen).to(DEV, dtype)
    y = tc_wna16_gluon(x, kern.packed, kern.scale, kern.zero, 128, GluonTcConfig(*cfg))
    assert rel_err(y, x.double() @ w.dequantize().to(DEV).double().t()) < 1e-2
