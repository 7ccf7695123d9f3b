"""`ring_w8`: 8-bit W8A8 at 2..32 rows with weight and activation-code tiles streamed by TMA through a
shared-memory ring, wgmma reading both there (Gluon, sm_90).

CPU: the sm_90 PTX (TMA copies only, the wgmma count and types, the PDL order: the weight tiles are requested
before `griddepcontrol.wait`, the code tiles after), the errors, the tile table and its env switch, the dispatch's
reason. GPU (-m accelerator): the kernel against the float64 product of the same codes over dtypes, rows,
tiles, ragged column tiles and K splits; the W8A8 dispatch with codes made by it or handed over; a CUDA graph.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests._cuda_env import DEV, NEEDS_TRITON, PLATFORM, compile_gluon_sm90
from tests.test_cuda_frag_w8 import _codes  # e4m3 / int8 codes on the device, no NaN

pytestmark = NEEDS_TRITON
FP8 = torch.float8_e4m3fn


def _compile(dt: torch.dtype, bn: int, bm: int, stages: int, pdl: bool, boxes: int, split: int = 2) -> str:
    from triton.experimental.gluon import language as gl

    from quantrt.platforms.cuda.kernels import ring_w8 as R
    from quantrt.platforms.cuda.kernels.ring_common import tma_desc

    n, k = 256, 1024
    a, w = torch.zeros(4, k, dtype=dt), torch.zeros(n, k, dtype=dt)
    sc, y = torch.zeros(n), torch.zeros(4, n, dtype=torch.bfloat16)
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, bm, 32])
    return compile_gluon_sm90(R._ring_w8_kernel, [
        tma_desc(a, [4, k], [k, 1], [bm, 128], 128), tma_desc(w, [n, k], [k, 1], [bn, 128], 128), sc, sc, y, sc, sc,
        4, n, k, k // split, bn, 128, bm, stages, split, 1, dt == torch.int8, pdl, False, mma, pdl, boxes])


@pytest.mark.gluon_compile
@pytest.mark.parametrize("dt,bn,bm,stages,pdl,boxes", [(FP8, 128, 16, 4, True, 1), (torch.int8, 64, 8, 6, True, 2),
                                                       (FP8, 64, 32, 3, False, 4)])
def test_kernel_compiles_for_sm90_to_tma_and_wgmma(dt, bn, bm, stages, pdl, boxes):
    ptx = _compile(dt, bn, bm, stages, pdl, boxes)
    typ = "s32.s8.s8" if dt == torch.int8 else "f32.e4m3.e4m3"
    wgmma = len(re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{bm}k32\.{typ}", ptx))
    assert wgmma == boxes * (bn // 64) * (128 // 32)
    # per slot and box a weight and a code copy before the loop, and one of each in it; no operand goes through
    # registers
    assert ptx.count("cp.async.bulk.tensor.2d") == boxes * (2 * stages + 2)
    loop = ptx[ptx.index("wgmma.fence"):ptx.rindex("wgmma.wait_group")]
    assert "ld.global" not in loop and "ld.shared" not in loop and "shfl" not in ptx
    if pdl:   # the weight tiles go out before the wait for the codes; the next op is released after the loop
        first_tma, wait = ptx.index("cp.async.bulk.tensor"), ptx.index("griddepcontrol.wait")
        assert first_tma < wait and ptx[first_tma:wait].count("cp.async.bulk.tensor") == boxes * stages
        assert ptx.rindex("wgmma.mma_async") < ptx.index("griddepcontrol.launch_dependents")
    else:
        assert "griddepcontrol" not in ptx


@pytest.mark.gluon_compile
def test_activation_descriptors_are_not_cached():
    """The weight's TMA descriptor is cached by pointer (CUDA graphs replay it); the codes' is made per call, since
    a cached descriptor keeps its tensor alive (eager decode would pile up a code tensor a call)."""
    from quantrt.platforms.cuda.kernels import ring_common as C

    t = torch.zeros(4, 256, dtype=FP8)
    before = len(C._DESC_CACHE)
    C.tma_desc(t, [4, 256], [256, 1], [8, 128], swizzle=128, cache=False)
    assert len(C._DESC_CACHE) == before
    d = C.tma_desc(t, [4, 256], [256, 1], [8, 128], swizzle=128)
    assert C.tma_desc(t, [4, 256], [256, 1], [8, 128], swizzle=128) is d and len(C._DESC_CACHE) == before + 1


def test_errors_name_the_problem():
    from quantrt.platforms.cuda.kernels.ring_w8 import RingW8Config, ring_w8, ring_w8_why_not

    cpu = torch.device("cpu")
    assert "M=33 is outside 1..32" in ring_w8_why_not(33, 4096, 4096, FP8, FP8, cpu, RingW8Config(block_m=32))
    assert "M=9 is outside 1..8" in ring_w8_why_not(9, 4096, 4096, FP8, FP8, cpu, RingW8Config(block_m=8))
    assert "K=4000 is not a multiple of block_k 128 x boxes 1" in ring_w8_why_not(2, 4096, 4000, FP8, FP8, cpu)
    assert "K=4224 is not a multiple of block_k 128 x boxes 4" in ring_w8_why_not(2, 64, 4224, FP8, FP8, cpu,
                                                                                 RingW8Config(boxes=4))
    assert "e4m3 or int8 codes of one dtype" in ring_w8_why_not(2, 4096, 4096, torch.int8, FP8, cpu)
    assert "block_n 64/128" in ring_w8_why_not(2, 4096, 4096, FP8, FP8, cpu, RingW8Config(block_n=32))
    assert "1-12 stages" in ring_w8_why_not(2, 4096, 4096, FP8, FP8, cpu, RingW8Config(stages=13))
    assert "not a CUDA device" in ring_w8_why_not(2, 4096, 4096, FP8, FP8, cpu)
    a, w = torch.zeros(2, 256, dtype=FP8), torch.zeros(64, 256, dtype=FP8)
    with pytest.raises(ValueError, match=r"ring_w8 cannot compute a \(2, 256\) x w \(64, 256\): not a CUDA device"):
        ring_w8(a, torch.ones(2), w, torch.ones(1), torch.bfloat16)
    with pytest.raises(ValueError, match=r"x w \(64, 384\): K differs between the operands"):
        ring_w8(a, torch.ones(2), torch.zeros(64, 384, dtype=FP8), torch.ones(1), torch.bfloat16)
    with pytest.raises(ValueError, match=r"1 activation scales for 2 rows"):
        ring_w8(a, torch.ones(1), w, torch.ones(1), torch.bfloat16)
    with pytest.raises(ValueError, match=r"32 weight scales for 64 weight rows \(needs 1 or 64\)"):
        ring_w8(a, torch.ones(2, 1), w, torch.ones(32), torch.bfloat16)


def test_tile_table_and_its_switch(monkeypatch):
    from quantrt.platforms.cuda.kernels import ring_w8 as R

    monkeypatch.delenv("QUANTRT_CUDA_RING_W8", raising=False)
    monkeypatch.setattr(R, "_TILES", {("f8", 16, 8192, 8192): (128, 128, 6, 2, 0, 16, 1)})
    assert R.tile_for(12, 8192, 8192, False) == R.RingW8Config(128, 128, 6, 2, 0, 16, 1)
    assert R.tile_for(12, 8192, 8192, True) is None and R.tile_for(4, 8192, 8192, False) is None
    assert R.tile_for(1, 8192, 8192, False) is None and R.tile_for(33, 8192, 8192, False) is None
    monkeypatch.setitem(R._TILES, ("f8", 8, 8192, 8192), (64, 128, 4, 2, 0, 8, 1, 2))
    assert R.tile_for(2, 8192, 8192, False).boxes == 2
    monkeypatch.setitem(R._TILES, ("i8", 8, 8192, 8192), (64, 128, 4, 2, 0, 8, 1, 2))
    assert R.tile_for(R.MIN_M["i8"], 8192, 8192, True).boxes == 2 and R.tile_for(2, 8192, 8192, True) is None
    monkeypatch.setenv("QUANTRT_CUDA_RING_W8", "0")
    assert R.tile_for(12, 8192, 8192, False) is None
    monkeypatch.delenv("QUANTRT_CUDA_RING_W8")
    monkeypatch.setenv("QUANTRT_CUDA_RING_W8_TILES", "i8:16:4096:6144=128:128:4:1:1:16:1:2")
    assert R.tile_for(12, 4096, 6144, True) == R.RingW8Config(128, 128, 4, 1, 1, 16, 1, 2)
    monkeypatch.setenv("QUANTRT_CUDA_RING_W8_TILES", "i4:16:4096:6144=128")
    with pytest.raises(ValueError, match=r"entry 'i4:16:4096:6144=128' is not 'f8\|i8:bucket:K:N=block_n"):
        R.tile_for(12, 4096, 6144, True)
    monkeypatch.delenv("QUANTRT_CUDA_RING_W8_TILES")
    monkeypatch.setenv("QUANTRT_CUDA_RING_W8", "all")
    assert R.tile_for(3, 4096, 6144, True) == R.RingW8Config(block_m=8)
    assert R.tile_for(20, 4096, 6144, False).block_m == 32


def test_dispatch_says_why_not():
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, ScaleGranularity

    w = torch.zeros(256, 256, dtype=FP8, device=DEV)
    ch = FloatWeight(w, torch.ones(256, device=DEV), ScaleGranularity.CHANNEL)
    wonly = TritonW8A8Kernel.prepare(LinearSpec(ch, ActScheme(), torch.bfloat16), PLATFORM)
    assert "per-token/static activations" in wonly.ring_why
    tok = TritonW8A8Kernel.prepare(LinearSpec(ch, ActScheme(ActKind.DYNAMIC_TOKEN, FP8), torch.bfloat16), PLATFORM)
    assert tok.ring_why == ("" if DEV == "cuda" else "ring_w8 is a Gluon kernel: it needs a GPU and triton >= 3.5")
    odd = FloatWeight(torch.zeros(256, 320, dtype=FP8, device=DEV), torch.ones(256, device=DEV),
                      ScaleGranularity.CHANNEL)
    odd_k = TritonW8A8Kernel.prepare(LinearSpec(odd, ActScheme(ActKind.DYNAMIC_TOKEN, FP8), torch.bfloat16), PLATFORM)
    assert "K=320 is not a multiple of 128" in odd_k.ring_why


def test_rows_handed_over_as_bf16_take_the_row_gemv_at_two_rows(monkeypatch):
    """Where the row GEMV has a tile (it quantizes inside), bf16 rows go there and codes to the ring: the ring on
    bf16 rows would need a code launch first (the o projection after attention)."""
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.platforms.cuda.kernels import ring_w8 as R
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, ScaleGranularity

    monkeypatch.delenv("QUANTRT_CUDA_RING_W8", raising=False)
    monkeypatch.setenv("QUANTRT_CUDA_GEMV_ROWS", "fp8:2")
    monkeypatch.setattr(R, "_TILES", {("f8", 8, 256, 64): (64, 128, 2, 1, 1, 8, 1, 1)})
    w = FloatWeight(torch.zeros(64, 256, dtype=FP8, device=DEV), torch.ones(64, device=DEV), ScaleGranularity.CHANNEL)
    kern = TritonW8A8Kernel.prepare(LinearSpec(w, ActScheme(ActKind.DYNAMIC_TOKEN, FP8), torch.bfloat16), PLATFORM)
    kern.ring_why = ""                                  # as on an H100
    assert kern._plan(2, codes=True)[0] == "ring" and kern.row_codes(2) is not None
    assert kern._plan(2, codes=False)[0] == "rows"
    assert kern._plan(3, codes=False)[0] == "ring"      # no row GEMV tile at 3 rows: a code launch, then the ring


# RingW8Config(block_n, block_k, stages, waves, split_k, block_m, pdl, boxes)
@pytest.mark.accelerator
@pytest.mark.parametrize("dt", [FP8, torch.int8])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 16, 17, 32])
@pytest.mark.parametrize("n,k,cfg", [
    (4096, 4096, None),
    (200, 1024, (128, 128, 4, 2, 3, 8, 1, 1)),   # ragged column tile, 3 splits of 8 steps (3, 3, 2)
    (384, 14336, (64, 128, 6, 2, 0, 8, 0, 1)),    # no PDL, split from waves
    (1000, 640, (128, 64, 12, 1, 1, 8, 1, 1)),    # one split, a ring deeper than the slice, BK 64
    (320, 2816, (64, 128, 3, 2, 4, 8, 1, 2)),     # 2 boxes a step, 4 splits of 11 steps (3, 3, 3, 2)
    (4096, 4096, (64, 128, 3, 2, 0, 8, 1, 4)),    # 4 boxes a step
])
def test_ring_w8_native(dt, m, n, k, cfg):
    from quantrt.platforms.cuda.kernels.frag_w8 import frag_reference
    from quantrt.platforms.cuda.kernels.ring_w8 import RingW8Config, ring_w8

    gen = torch.Generator(device=DEV).manual_seed(m * 7 + n)
    a, w = _codes(m, k, dt, gen), _codes(n, k, dt, gen)
    sa = torch.rand(m, 1, device=DEV, generator=gen) * 0.01 + 1e-3
    if cfg is not None:
        cfg = RingW8Config(*cfg[:5], max(cfg[5], 8 if m <= 8 else 16 if m <= 16 else 32), *cfg[6:])
    for sw in (torch.rand(n, device=DEV, generator=gen) * 0.01 + 1e-3, torch.full((1,), 0.003, device=DEV)):
        y = ring_w8(a, sa, w, sw, torch.bfloat16, cfg)
        ref = frag_reference(a, sa, w, sw)
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        assert y.shape == (m, n) and err < 4e-3, (m, n, k, err)


@pytest.mark.accelerator
@pytest.mark.parametrize("dt", [FP8, torch.int8])
@pytest.mark.parametrize("m", [3, 8, 16])
@pytest.mark.parametrize("handed_over", [False, True])
@pytest.mark.parametrize("mode", ["", "all"])
def test_w8a8_dispatch_runs_ring_w8(dt, m, handed_over, mode, monkeypatch):
    """Per-token activations through the W8A8 dispatch on the ring (its tile table at this Llama shape, or every
    shape's default tile with QUANTRT_CUDA_RING_W8=all; where the table keeps the path before, that path): codes
    made by the kernel, or handed over by the producing op (`row_codes` / `QuantizedRows`), against the float64
    product of x quantized by quantrt.quant.quantize."""
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.platforms.cuda.kernels.ring_w8 import tile_for
    from quantrt.quant.kernel import LinearSpec, QuantizedRows
    from quantrt.quant.quantize import quantize_act_per_token
    from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, IntWeight, ScaleGranularity

    monkeypatch.setenv("QUANTRT_CUDA_RING_W8", mode)
    n, k = 6144, 4096
    gen = torch.Generator(device=DEV).manual_seed(m)
    w = _codes(n, k, dt, gen)
    sw = torch.rand(n, device=DEV, generator=gen) * 0.01 + 1e-3
    wt = IntWeight(w, sw.reshape(-1, 1), 8, k) if dt == torch.int8 else FloatWeight(w, sw, ScaleGranularity.CHANNEL)
    kern = TritonW8A8Kernel.prepare(LinearSpec(wt, ActScheme(ActKind.DYNAMIC_TOKEN, dt), torch.bfloat16), PLATFORM)
    on_ring = bool(mode) or tile_for(m, k, n, dt == torch.int8) is not None     # the table: not int8 at 9-16 rows
    assert (kern._plan(m)[0] == "ring") == on_ring and kern.row_codes(m) is not None   # frag_w8 takes codes too
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16, generator=gen)
    q, s = quantize_act_per_token(x, dt)
    ref = (q.double() * s.double()) @ (w.double() * sw.double()[:, None]).t()
    y = kern.apply(QuantizedRows(q, s.float()) if handed_over else x, None)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 4e-3


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [2, 16])
def test_ring_w8_replays_in_a_cuda_graph(m):
    from quantrt.platforms.cuda.kernels.frag_w8 import frag_reference
    from quantrt.platforms.cuda.kernels.ring_w8 import ring_w8

    gen = torch.Generator(device=DEV).manual_seed(3)
    a, w = _codes(m, 4096, FP8, gen), _codes(4096, 4096, FP8, gen)
    sa, sw = torch.full((m, 1), 0.01, device=DEV), torch.full((4096,), 0.002, device=DEV)
    ring_w8(a, sa, w, sw, torch.bfloat16)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = ring_w8(a, sa, w, sw, torch.bfloat16)
    for _ in range(3):
        a.copy_(_codes(m, 4096, FP8, gen))
        g.replay()
        ref = frag_reference(a, sa, w, sw)
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 4e-3
