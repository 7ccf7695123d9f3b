"""Per-token activation scales found inside the W8A8 launch (`token_scale_sync_triton` in `swap_fp8`) and the
chunked side-stream quantization in front of `_scaled_mm` (`scaled_mm_overlap`), vs a float64 reference of the
quantize-then-matmul definition: codes and scales from `quantize_act_per_token`, times the dequantized weight.

Under TRITON_INTERPRET=1 (CI) the int8 cases run at tiny shapes (programs run one after another there, so one
scale writer); fp8 activations are native-only (Triton 3.6's interpreter does not round fp32 -> fp8 to
nearest). `-m accelerator` runs Llama-sized fp8 shapes with many writers, and under CUDA-graph replay.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

from quantrt.quant.quantize import quantize_act_per_token, quantize_fp8  # noqa: E402
from quantrt.quant.weights import IntWeight  # noqa: E402
from tests.test_cuda_kernels import DEV, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install triton)")
FP8 = torch.float8_e4m3fn


def _ref64(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 (x quantized per token, as quantize_act_per_token) @ (codes * per-channel scale)^T."""
    q, s = quantize_act_per_token(x, dtype)
    return (q.double() * s.double()) @ (wq.double() * w_scale.double().reshape(-1, 1)).t()


def _buffers_zero(device) -> bool:
    from quantrt.platforms.cuda.kernels.token_scale_sync_triton import sync_buffers

    cnt, amax = sync_buffers(torch.device(device))
    return bool((cnt == 0).all()) and bool((amax == 0).all())


def _int8_weight(n: int, k: int, gen: torch.Generator) -> IntWeight:
    codes = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
    return IntWeight(codes.to(DEV), (torch.rand(n, 1, generator=gen) * 0.01).to(DEV), 8, k)


def test_writer_split_covers_k_with_at_most_one_writer_per_program():
    from quantrt.platforms.cuda.kernels.token_scale_sync_triton import writer_split

    for k, programs, kw, bka in [(8192, 384, 512, 256), (14336, 40, 512, 256), (320, 1, 512, 64), (4096, 3, 64, 16)]:
        s, w = writer_split(k, programs, kw, bka)
        assert s * w >= k > (s - 1) * w and w % bka == 0 and s <= max(programs, 1)
        if DEV == "cpu":
            assert s == 1  # the interpreter runs programs in order: a second writer would never arrive


@pytest.mark.parametrize("m", [1, 5, 16])
def test_swap_fused_scale_int8_equals_separate_launch(m):
    """int8 per token: scales found in the launch == the separate scale launch, bit for bit; both vs float64;
    the sync buffers are zero again afterwards (so the next launch, or a graph replay, starts clean)."""
    from quantrt.platforms.cuda.kernels.swap_fp8 import SwapFp8Config, swap_fp8

    gen = torch.Generator().manual_seed(m)
    w = _int8_weight(96, 320, gen)
    ws = w.scale.reshape(-1).contiguous()
    x = (torch.randn(m, 320, generator=gen) * 2).to(DEV, torch.float16)
    fused = swap_fp8(x, w.codes, ws, 0, 1, 127.0, None, SwapFp8Config(32, 64, 2, 4, 1, 16, True, 64))
    assert _buffers_zero(DEV)
    separate = swap_fp8(x, w.codes, ws, 0, 1, 127.0, None, SwapFp8Config(32, 64, 2, 4, 1, 16, False))
    assert torch.equal(fused, separate)
    again = swap_fp8(x, w.codes, ws, 0, 1, 127.0, None, SwapFp8Config(32, 64, 2, 4, 1, 16, True, 64))
    assert torch.equal(fused, again)
    assert rel_err(fused, _ref64(x, w.codes, ws, torch.int8)) < 2e-3


def test_quant_rows_out_writes_in_place_and_checks_buffers():
    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows

    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 300, generator=gen) * 3).to(DEV, torch.bfloat16)
    q = torch.zeros(10, 300, dtype=torch.int8, device=DEV)
    s = torch.zeros(10, 1, dtype=torch.float32, device=DEV)
    q2, s2 = quant_rows(x, torch.int8, 127.0, out=(q[2:8], s[2:8]))
    q_ref, s_ref = quantize_act_per_token(x, torch.int8)
    assert q2.data_ptr() == q[2:8].data_ptr() and torch.equal(q[2:8], q_ref) and torch.equal(s[2:8], s_ref)
    assert (q[:2] == 0).all() and (q[8:] == 0).all()
    with pytest.raises(ValueError, match=r"codes \[6, 300\] torch.int8 row-contiguous"):
        quant_rows(x, torch.int8, 127.0, out=(q[:6, :150], s[:6]))
    with pytest.raises(ValueError, match="scales"):
        quant_rows(x, torch.int8, 127.0, out=(q[:6], s[:6].to(torch.float16)))


def test_chunk_rows():
    from quantrt.platforms.cuda.kernels.scaled_mm_overlap import chunk_rows

    assert chunk_rows(8192, 4) == [(0, 2048), (2048, 4096), (4096, 6144), (6144, 8192)]
    assert chunk_rows(1000, 4) == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    assert chunk_rows(100, 4) == [(0, 100)]


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("k,n", [(4096, 4096), (14336, 1024)])
def test_swap_fused_scale_fp8_native(m, k, n):
    """fp8 per token at Llama-sized K with many scale writers, vs float64 and == the separate scale launch."""
    from quantrt.platforms.cuda.kernels._common import cdiv, num_sms
    from quantrt.platforms.cuda.kernels.swap_fp8 import SwapFp8Config, swap_fp8
    from quantrt.platforms.cuda.kernels.token_scale_sync_triton import writer_split

    gen = torch.Generator().manual_seed(m + k)
    w = quantize_fp8(torch.randn(n, k, generator=gen), "channel")
    data, ws = w.data.to(DEV), w.scale.to(DEV, torch.float32).reshape(-1).contiguous()
    x = (torch.randn(m, k, generator=gen) * 3).to(DEV, torch.bfloat16)
    x[0, 7] = 40.0  # one outlier sets row 0's scale
    cfg = SwapFp8Config(64, 256, 2, 4, 3, 16, True, 512)
    split = cdiv(2 * num_sms(0), cdiv(n, 64))
    assert writer_split(k, cdiv(n, 64) * split, 512, 256)[0] > 1
    fused = swap_fp8(x, data, ws, 0, 1, 448.0, None, cfg)
    separate = swap_fp8(x, data, ws, 0, 1, 448.0, None, SwapFp8Config(64, 256, 2, 4, 3, 16, False))
    assert torch.equal(fused, separate)
    assert rel_err(fused, _ref64(x, data, ws, FP8)) < 1e-2
    assert _buffers_zero(DEV)


@pytest.mark.accelerator
def test_swap_fused_scale_under_cuda_graph_replay():
    """Three fused linears captured in one graph; every replay with new activations matches float64."""
    from quantrt.platforms.cuda.kernels.swap_fp8 import swap_fp8

    gen = torch.Generator().manual_seed(9)
    ws = [quantize_fp8(torch.randn(2048, 4096, generator=gen), "channel") for _ in range(3)]
    ws = [(w.data.to(DEV), w.scale.to(DEV, torch.float32).reshape(-1).contiguous()) for w in ws]
    x = torch.zeros(8, 4096, device=DEV, dtype=torch.bfloat16)

    def step() -> list[torch.Tensor]:
        return [swap_fp8(x, d, s, 0, 1, 448.0) for d, s in ws]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                                                     # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = step()
    for r in range(3):
        x.copy_((torch.randn(8, 4096, generator=gen) * (r + 1)).to(DEV, torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        for y, (d, s) in zip(ys, ws):
            assert rel_err(y, _ref64(x, d, s, FP8)) < 1e-2
    assert _buffers_zero(DEV)


@pytest.mark.accelerator
@pytest.mark.parametrize("m,chunks", [(1000, 4), (4096, 2)])
def test_scaled_mm_overlapped_native(m, chunks):
    """Side-stream chunked quantization + chunked `_scaled_mm` == quantize all + one `_scaled_mm`, vs float64;
    refused under graph capture with a message; TritonW8A8Kernel takes it from OVERLAP_MIN_M rows."""
    from quantrt.platform.interface import DeviceCapability
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.platforms.cuda.kernels import w8a8 as w8a8_mod
    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows
    from quantrt.platforms.cuda.kernels.scaled_mm_overlap import scaled_mm_overlapped
    from quantrt.platforms.cuda.platform import CudaPlatform
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import ActKind, ActScheme

    gen = torch.Generator().manual_seed(m)
    w = quantize_fp8(torch.randn(512, 1024, generator=gen), "channel")
    data, ws = w.data.to(DEV), w.scale.to(DEV, torch.float32).reshape(1, -1).contiguous()
    x = (torch.randn(m, 1024, generator=gen) * 2).to(DEV, torch.bfloat16)
    y = scaled_mm_overlapped(x, data, ws, 448.0, torch.bfloat16, chunks)
    q, s = quant_rows(x, FP8, 448.0)
    assert torch.equal(y, torch._scaled_mm(q, data.t(), scale_a=s, scale_b=ws, out_dtype=torch.bfloat16))
    assert rel_err(y, _ref64(x, data, ws, FP8)) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="not for use under CUDA-graph capture"):
        with torch.cuda.graph(graph):
            scaled_mm_overlapped(x, data, ws, 448.0, torch.bfloat16, chunks)
    if m >= w8a8_mod.OVERLAP_MIN_M:
        kern = TritonW8A8Kernel.prepare(LinearSpec(w.__class__(data, w.scale.to(DEV), w.granularity),
                                                   ActScheme(ActKind.DYNAMIC_TOKEN, FP8), torch.bfloat16),
                                        CudaPlatform(capability=DeviceCapability(9, 0), device_name="test"))
        assert torch.equal(kern.apply(x, None), y)
