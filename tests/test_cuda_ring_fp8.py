"""ring_fp8: FP8 W8A8 at M <= 16 with the weight tiles streamed by TMA through a shared-memory ring (Gluon, sm_90).

On the CPU (CI): the kernel compiles for sm_90 (the triton wheel's ptxas) with wgmma reading e4m3 from shared
memory, IEEE division for the activation codes and no shuffles; the dispatch reasons and error messages.
Natively (`-m accelerator`, an H100): against the float64 product of the per-token fake-quantized activations
and the dequantized weight, over M, dtypes, static/per-token activation and tensor/channel weight scales,
ragged tiles and K splits, and the TritonW8A8Kernel dispatch at a Llama shape.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

from quantrt.quant.kernel import LinearSpec  # noqa: E402
from quantrt.quant.quantize import quantize_act_per_token  # noqa: E402
from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, ScaleGranularity  # noqa: E402
from tests._cuda_env import DEV, PLATFORM, compile_gluon_sm90  # noqa: E402
from tests.test_cuda_kernels import rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.experimental.gluon") is None,
    reason="triton with Gluon (>= 3.5) is not installed")
FP8 = torch.float8_e4m3fn


def _weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(FP8)
    return data.to(DEV), (torch.rand(n, generator=g) * 0.01 + 1e-3).to(DEV)


@pytest.mark.gluon_compile
@pytest.mark.parametrize("bn,bm,act,wscale,dtype", [(64, 8, 0, 1, torch.bfloat16), (128, 16, 2, 0, torch.float16)])
def test_kernel_compiles_for_sm90(bn, bm, act, wscale, dtype):
    from triton.experimental.gluon import language as gl

    from quantrt.platforms.cuda.kernels import ring_fp8 as R

    n, k, bk = 256, 1024, 128
    x = torch.zeros(4, k, dtype=dtype)
    w = torch.zeros(n, k, dtype=FP8)
    sc = torch.zeros(n)
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, bm, 32])
    x_layout = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16], warps_per_cta=[4, 1], order=[1, 0])
    x_smem = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    ptx = compile_gluon_sm90(R._ring_fp8_kernel, [x, R._w_desc(w, bn, bk), sc, sc, x, sc, sc, 4, n, k, k, 512, bn, bk,
                                                  bm, 3, 2, act, wscale, x_layout, mma, x_smem])
    assert "cp.async.bulk.tensor.2d" in ptx and "mbarrier.try_wait" in ptx
    assert ptx.count(f"wgmma.mma_async.sync.aligned.m64n{bm}k32.f32.e4m3.e4m3") == (bn // 64) * (bk // 32)
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx     # codes of x / s exactly as fake_quantize_act
    assert "shfl" not in ptx


def test_can_run_and_errors_name_the_problem():
    from quantrt.platforms.cuda.kernels.ring_fp8 import RingFp8Config, can_run, default_config, ring_fp8

    assert can_run(16, 4096, 4096, FP8, torch.bfloat16, 0, 1) == (True, "")
    assert "not float8_e4m3fn" in can_run(4, 4096, 4096, torch.int8, torch.bfloat16, 0, 1)[1]
    assert "activation mode 1" in can_run(4, 4096, 4096, FP8, torch.bfloat16, 1, 1)[1]
    assert "weight scale 2" in can_run(4, 4096, 4096, FP8, torch.bfloat16, 0, 2)[1]
    assert "M=17 is outside 1..16" in can_run(17, 4096, 4096, FP8, torch.bfloat16, 0, 1)[1]
    assert "K=4000 is not a multiple of block_k 128" in can_run(2, 4096, 4000, FP8, torch.bfloat16, 0, 1)[1]
    assert default_config(3, 4096, 4096).block_m == 8 and default_config(9, 4096, 4096).block_m == 16
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"ring_fp8 cannot run this call: weights are torch.int8"):
        ring_fp8(x, torch.zeros(64, 256, dtype=torch.int8), torch.ones(64), 0, 1)
    with pytest.raises(ValueError, match=r"needs act_scale"):
        ring_fp8(x, torch.zeros(64, 256, dtype=FP8), torch.ones(64), 2, 1)
    with pytest.raises(ValueError, match=r"needs block_n 64/128"):
        ring_fp8(x, torch.zeros(64, 256, dtype=FP8), torch.ones(64), 0, 1, cfg=RingFp8Config(block_n=32))


# RingFp8Config(block_n, block_k, stages, waves, split_k, block_m)
@pytest.mark.accelerator
@pytest.mark.parametrize("m,dtype,act,wscale,cfg", [
    (2, torch.bfloat16, 0, 1, None),
    (5, torch.float16, 0, 0, (64, 128, 2, 4, 3, 8)),       # 3 ragged splits of K = 640
    (8, torch.bfloat16, 2, 1, (128, 128, 4, 1, 0, 8)),      # BN 128 over N = 96: masked rows
    (16, torch.bfloat16, 0, 1, None),
    (12, torch.float16, 2, 0, (64, 64, 6, 2, 0, 16)),       # BK 64, ring deeper than the slice
])
def test_ring_fp8_native(m, dtype, act, wscale, cfg):
    from quantrt.platforms.cuda.kernels.ring_fp8 import RingFp8Config, ring_fp8

    w, sw = _weight(96, 640, m)
    sw = sw[:1].clone() if wscale == 0 else sw
    x = torch.randn(m, 640, generator=torch.Generator().manual_seed(m)).to(DEV, dtype)
    if act == 0:
        q, sx = quantize_act_per_token(x, FP8)
        sa = None
    else:
        sa = (x.abs().amax().float() / 448.0).reshape(1)
        q, sx = (x.float() / sa).clamp(-448, 448).to(FP8), sa
    ref = (q.double() * sx.double()) @ (w.double() * sw.double()[:, None]).t()
    y = ring_fp8(x, w, sw, act, wscale, sa, RingFp8Config(*cfg) if cfg else None)
    assert y.dtype == dtype and y.shape == (m, 96)
    assert rel_err(y, ref) < 2e-3


def test_w8a8_dispatch_keeps_the_ring_kernel_off_unless_asked(monkeypatch):
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel

    w, sw = _weight(64, 256, 0)
    spec = LinearSpec(FloatWeight(w, sw, ScaleGranularity.CHANNEL), ActScheme(ActKind.DYNAMIC_TOKEN, FP8),
                      torch.bfloat16)
    monkeypatch.delenv("QUANTRT_CUDA_RING_FP8", raising=False)
    assert "QUANTRT_CUDA_RING_FP8=1 turns it on" in TritonW8A8Kernel.prepare(spec, PLATFORM).ring_why
    monkeypatch.setenv("QUANTRT_CUDA_RING_FP8", "1")
    why = TritonW8A8Kernel.prepare(spec, PLATFORM).ring_why
    assert why == ("" if DEV == "cuda" else "not a CUDA device (Gluon/TMA kernel)")


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [2, 16])
def test_w8a8_dispatch_runs_the_ring_kernel_at_a_llama_shape(m, monkeypatch):
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel

    monkeypatch.setenv("QUANTRT_CUDA_RING_FP8", "1")
    w, sw = _weight(6144, 4096, m)
    spec = LinearSpec(FloatWeight(w, sw, ScaleGranularity.CHANNEL), ActScheme(ActKind.DYNAMIC_TOKEN, FP8),
                      torch.bfloat16)
    kern = TritonW8A8Kernel.prepare(spec, PLATFORM)
    assert kern.ring_why == ""
    x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(7)).to(DEV, torch.bfloat16)
    q, sx = quantize_act_per_token(x, FP8)
    ref = (q.double() * sx.double()) @ (w.double() * sw.double()[:, None]).t()
    assert rel_err(kern.apply(x, None), ref) < 2e-3
