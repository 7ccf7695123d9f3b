"""The batch 2-16 W4A16 tensor-core linear with and without the next K step prefetched vs float64.

`tc_wna16` with `TcConfig.prefetch` 1 (the next K step's words loaded into registers before this step's
unpack; the M <= 16 4-bit default) and 0. Under TRITON_INTERPRET=1 at tiny shapes (ragged N and K tails,
split-K); `-m accelerator` adds a Llama-sized shape natively. Reference: x @ the dequantized weight in float64.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

from quantrt.quant.kernel import LinearSpec  # noqa: E402
from quantrt.quant.weights import ActScheme  # noqa: E402
from tests.test_cuda_kernels import DEV, PLATFORM, TritonWNA16Kernel, make_int_weight, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install triton)")


def _wna16(m: int, n: int, k: int, bits: int, group: int, dtype: torch.dtype, cfg, seed: int):
    from quantrt.platforms.cuda.kernels.tc_wna16 import TcConfig, tc_wna16

    gen = torch.Generator().manual_seed(seed)
    w = make_int_weight(n, k, bits, group, True, False, gen)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), dtype), PLATFORM)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    y = tc_wna16(x, kern.packed, kern.scale, kern.zero, group, TcConfig(*cfg) if cfg else None, bits=bits,
                 zero_const=kern.zero_const)
    ref = x.double() @ w.dequantize().to(DEV).double().t()
    return y, ref


# TcConfig(block_n, block_k, split_k, num_warps, num_stages, waves, swap, block_m, prefetch)
@pytest.mark.parametrize("m,bits,cfg", [
    (3, 4, (64, 128, 3, 4, 1, 4, True, 16, 1)),    # prefetch, 3 ragged splits of K = 640
    (6, 4, (64, 128, 2, 4, 1, 4, True, 16, 1)),    # prefetch, splits of 3 and 2 steps (last step of a split)
    (16, 4, (64, 128, 2, 4, 1, 4, True, 16, 0)),   # no prefetch, N tail masked
    (5, 8, (64, 128, 3, 4, 1, 4, True, 16, 1)),    # 8-bit container with prefetch
    (9, 4, (32, 64, 0, 4, 1, 4, False, 16, 1)),    # unswapped dot, prefetch, split by waves
])
def test_tc_wna16_pipelined(m, bits, cfg):
    y, ref = _wna16(m, 96, 640, bits, 128 if cfg[1] == 128 else 64, torch.float16, cfg, m)
    assert rel_err(y, ref) < 2e-3


# K steps of 128 rows spanning several GGUF-size groups (scale and zero per packed row)
@pytest.mark.parametrize("m,bits,group,cfg", [
    (5, 4, 32, (64, 128, 2, 4, 1, 4, True, 16, 1)),     # 4 groups per step, prefetch, 2 ragged splits
    (3, 4, 64, (32, 128, 0, 4, 1, 4, True, 16, 0)),     # 2 groups per step
    (20, 4, 32, (64, 128, 0, 4, 1, 4, False, 32, 0)),   # unswapped, 2 BM tiles
    (6, 8, 32, (64, 128, 2, 4, 1, 4, True, 16, 0)),     # 8-bit container (4 codes a word), 4 groups per step
])
def test_tc_wna16_multi_group_steps(m, bits, group, cfg):
    y, ref = _wna16(m, 96, 640, bits, group, torch.float16, cfg, m)
    assert rel_err(y, ref) < 2e-3


@pytest.mark.parametrize("prefetch", [2, -1, "1"])
def test_tc_wna16_rejects_bad_prefetch(prefetch):
    from quantrt.platforms.cuda.kernels.tc_wna16 import TcConfig, tc_wna16

    x = torch.zeros(4, 256, dtype=torch.float16)
    p = torch.zeros(32, 64, dtype=torch.int32)
    s = torch.zeros(2, 64)
    with pytest.raises(ValueError, match=r"TcConfig.prefetch must be 0 .* or 1 .*got"):
        tc_wna16(x, p, s, s, 128, TcConfig(prefetch=prefetch))


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [2, 9, 16])
@pytest.mark.parametrize("cfg", [(64, 128, 0, 4, 3, 4, True, 16, 1), (64, 128, 0, 4, 3, 4, True, 16, 0), None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tc_wna16_pipelined_native(m, cfg, dtype):
    y, ref = _wna16(m, 4096, 8192, 4, 128, dtype, cfg, m)
    assert rel_err(y, ref) < 1e-2


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [2, 16, 40, 64, 130, 256])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 32)])
@pytest.mark.parametrize("cfg", [None, (64, 128, 0, 4, 3, 2, True, 64, 0)])   # None: the dispatch's tile
def test_tc_wna16_multi_group_native(m, bits, group, cfg):
    y, ref = _wna16(m, 4096, 4096, bits, group, torch.bfloat16, cfg, m)
    assert rel_err(y, ref) < 1e-2


_COMPILE_SM90 = r'''
import itertools, sys, torch
from quantrt.platforms.cuda.kernels import tc_wna16 as T
from tests._sm90 import compile_sm90

failed = []
for bf16, offset, multi, pack, swap in itertools.product((True, False), (True, False), (True, False), (8, 4),
                                                         (True, False)):
    if not swap and (pack == 4 or not bf16):
        continue
    dt = torch.bfloat16 if bf16 else torch.float16
    x, p, s = torch.zeros(16, 1024, dtype=dt), torch.zeros(1024 // pack, 256, dtype=torch.int32), torch.zeros(8, 256)
    vals = [x, p, s, s, x, s, p, 16, 256, 1024, 1024, 32 if multi else 128, 8.0, 512, 16, 64, 128, 2, True, bf16,
            False, swap, pack, True, multi, offset, offset or not bf16]
    # ... G, ZC, K_PER_SPLIT, BM, BN, BK, SPLIT, ASM, IS_BF16, DOT_F32, SWAP, PACK, PREFETCH, MULTI, OFFSET, HAS_ZERO
    # (bf16 without offsets: one zero point for every code, no zero array)
    try:
        ptx = compile_sm90(T._tc_wna16_kernel, vals, gluon=False, options={"num_stages": 3})
        want = "fma.rn.bf16x2" if bf16 else "fma.rn.f16x2"
        if pack == 8 and want not in ptx:
            failed.append((bf16, offset, multi, pack, swap, "no packed FMA"))
    except Exception as e:  # noqa: BLE001
        failed.append((bf16, offset, multi, pack, swap, str(e).splitlines()[-1][:200]))
print("FAILED", failed)
sys.exit(1 if failed else 0)
'''


@pytest.mark.gluon_compile
def test_tc_wna16_asm_variants_compile_for_sm90():
    """The inline-PTX unpack (ASM, GPU only) of every mode compiles for sm_90 (the triton wheel's ptxas, no GPU):
    bf16 / fp16, float offsets, multi-group steps, 8-bit container, unswapped dot. The interpreter runs only
    the plain-Triton twin, so a branch that does not type-check when compiled would otherwise pass CI."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
