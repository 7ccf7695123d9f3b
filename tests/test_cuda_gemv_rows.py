"""The W8A8 row GEMV at 2-16 rows (`gemv_w8_rows`) and its place in `TritonW8A8Kernel`'s dispatch, vs a float64
quantize-then-matmul reference (tests/test_cuda_fp8_gemv.py's `_spec` / `_ref64`).

Under TRITON_INTERPRET=1 (no GPU): int8 per-token and static activations at tiny shapes through the fp32-widening
path (the unrolled per-row accumulators, 2..8 rows), unsplit and split-K, ragged N and odd M; every rejection and
the `QUANTRT_CUDA_GEMV_ROWS` switch with their messages; and, compiled for sm_90 on the CPU, the layout property
the kernel is built for (the weight tile never moves between layouts) and the PDL order. Natively (`-m
accelerator`): fp8 and int8 (dp4a up to 16 rows) at the Llama-3.1-8B shapes, through the dispatch and a CUDA graph.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from tests._cuda_env import DEV, NEEDS_TRITON
from tests.test_cuda_fp8_gemv import FP8, LLAMA, NATIVE, _kernel, _ref64, _spec
from tests.test_cuda_kernels import rel_err

pytestmark = NEEDS_TRITON


def _xm(m: int, k: int, seed: int, mul: float = 1.0) -> torch.Tensor:
    gen = torch.Generator(device=DEV).manual_seed(seed + 7)
    x = torch.randn(m, k, generator=gen, device=DEV) * mul
    x[:, :: 5] *= torch.linspace(0.1, 4.0, m, device=DEV)[:, None]            # rows with different amax
    return x.to(torch.bfloat16)


def _rows(kern, x, cfg=None):
    from quantrt.platforms.cuda.kernels.gemv_w8_rows import gemv_w8_rows

    return gemv_w8_rows(x, kern.data, kern.w_scale, kern.act, kern.wscale, kern.qmax, kern.act_scale, cfg)


def _cfg(bn: int, bk: int, waves: int, warps: int = 4):
    from quantrt.platforms.cuda.kernels.gemv_w8 import GemvW8Config

    return GemvW8Config(bn, bk, waves, warps, 1 if NATIVE else 0, 1024, 1)


@pytest.mark.parametrize("scheme", ["i8", "i8s"])
@pytest.mark.parametrize("m,waves", [(2, 2), (3, 64), (4, 2), (5, 2), (8, 64)])  # 64 per SM: split K
def test_rows_tiny_match_float64(scheme, m, waves):
    spec = _spec(scheme, 72, 512, m + waves)                                  # N = 72: a ragged last tile of 16
    kern = _kernel(spec)
    x = _xm(m, 512, m + waves, 2.0)
    y = _rows(kern, x, _cfg(16, 128, waves))
    assert y.shape == (m, 72) and y.dtype == torch.bfloat16
    assert rel_err(y, _ref64(spec, x)) < 5e-3
    # each row is the one-row GEMV's result for that row (the rows share no state)
    from quantrt.platforms.cuda.kernels.gemv_w8 import gemv_w8

    one = torch.cat([gemv_w8(x[i:i + 1], kern.data, kern.w_scale, kern.act, kern.wscale, kern.qmax,
                             kern.act_scale, _cfg(16, 128, waves)) for i in range(m)])
    assert rel_err(y, one.double()) < 4e-3


def test_rows_strided_x():
    spec = _spec("i8", 32, 256, 3)
    kern = _kernel(spec)
    base = _xm(3, 512, 3)
    x = base[:, :256]                                                         # row stride 512
    assert rel_err(_rows(kern, x, _cfg(16, 64, 2)), _ref64(spec, x.contiguous())) < 5e-3


def test_rows_dispatch_switch_and_messages(monkeypatch):
    """QUANTRT_CUDA_GEMV_ROWS forces the row GEMV up to its rows on every shape; the dispatch result is correct;
    bad values, modes and row counts are refused with the reason."""
    from quantrt.platforms.cuda.kernels import gemv_w8_rows as R

    spec = _spec("i8", 48, 256, 11)
    monkeypatch.setenv("QUANTRT_CUDA_GEMV_ROWS", "i8:4")
    kern = _kernel(spec)
    for m in (2, 4):
        assert kern._plan(m)[0] == "rows"
        x = _xm(m, 256, m)
        assert rel_err(kern.apply(x, None), _ref64(spec, x)) < 5e-3
        assert kern.row_codes(m) is None                                      # quantizes its rows itself
    assert kern._plan(5)[0] != "rows"
    monkeypatch.setenv("QUANTRT_CUDA_GEMV_ROWS", "0")
    assert _kernel(spec)._plan(2)[0] != "rows"
    # unset: the measured table decides ("0" switches even a table entry off)
    monkeypatch.setitem(R._TILES, (256, 48), {"i8": ((2, (16, 128, 4)),)})
    assert R.tile_for(2, 256, 48, True) is None
    monkeypatch.delenv("QUANTRT_CUDA_GEMV_ROWS")
    assert R.tile_for(2, 256, 48, True).block_k == 128 and R.tile_for(3, 256, 48, True) is None
    kern = _kernel(spec)
    assert kern._plan(2)[0] == "rows" and kern._plan(3)[0] != "rows"
    assert R.tile_for(2, 256, 48, False) is None                               # no fp8 entry for this shape
    monkeypatch.setenv("QUANTRT_CUDA_GEMV_ROWS", "fp4:4")
    with pytest.raises(ValueError, match=r"ROWS='fp4:4': expected '' \(the tile table\), '0' \(off\) or e\.g\."):
        R.tile_for(2, 256, 48, False)
    monkeypatch.setenv("QUANTRT_CUDA_GEMV_ROWS", "fp8")
    with pytest.raises(ValueError, match="kinds fp8, i8"):
        R.tile_for(2, 256, 48, False)
    monkeypatch.delenv("QUANTRT_CUDA_GEMV_ROWS")
    cfg = _cfg(16, 64, 2)
    assert "outside 2..8" in R.gemv_w8_rows_why_not(9, 48, 256, 0, 1, False, cfg)
    dp4a = R.GemvW8Config(16, 64, 2, 4, 1, 1024, 1)
    assert "outside 2..16 (int8 codes through dp4a)" in R.gemv_w8_rows_why_not(17, 48, 256, 0, 1, True, dp4a)
    assert R.gemv_w8_rows_why_not(16, 48, 256, 0, 1, True, dp4a) == ""
    assert "per-token or static" in R.gemv_w8_rows_why_not(2, 48, 256, 1, 2, False, cfg)
    assert "block_k=128" in R.gemv_w8_rows_why_not(2, 48, 320, 0, 1, False, _cfg(16, 128, 2))
    with pytest.raises(ValueError, match="gemv_w8_rows cannot take this call: M=1 is outside"):
        _rows(_kernel(spec), _xm(1, 256, 0), cfg)


def test_rows_rejects_group_activations():
    """128x128 block weights with 128-group activations stay off the row GEMV (the reason says why)."""
    spec = _spec("grp", 256, 256, 2)
    kern = _kernel(spec)
    assert "per-token or static" in kern.rows_why(2)


_COMPILE = r'''
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type
from quantrt.platforms.cuda.kernels import gemv_w8_rows as R
n, k, bn, bk = 1024, 4096, 16, 512
for name, bm, is_int in (("fp8", 2, False), ("fp8", 8, False), ("int8", 16, True)):
    x, y = torch.zeros(bm, k, dtype=torch.bfloat16), torch.zeros(bm, n, dtype=torch.bfloat16)
    ws, cnt = torch.zeros(2, bm, n), torch.zeros(16, dtype=torch.int32)
    w = torch.zeros(n, k // 4, dtype=torch.int32) if is_int else torch.zeros(n, k, dtype=torch.float8_e4m3fn)
    vals = [x, w, ws, ws, y, ws, cnt, bm, n, k, k, k, 0, 1, 127.0 if is_int else 448.0, is_int, not is_int, bm,
            bn, bk, 512, k, 1, is_int, 1, True, True]
    fn = R._gemv_w8_rows_kernel
    sig, consts, attrs = {}, {}, {}
    for i, (p, v) in enumerate(zip(fn.params, vals, strict=True)):
        sig[p.name] = "constexpr" if p.is_constexpr else mangle_type(v)
        if p.is_constexpr:
            consts[(i,)] = v
        elif isinstance(v, torch.Tensor) or (type(v) is int and v % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    ck = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": 8, "num_stages": 1})
    open(f"{OUT}/{name}{bm}.ttgir", "w").write(ck.asm["ttgir"])
    open(f"{OUT}/{name}{bm}.ptx", "w").write(ck.asm["ptx"])
'''


@pytest.mark.gluon_compile
def test_rows_sm90_weight_tile_stays_in_its_layout(tmp_path):
    """Compiled for sm_90 on the CPU: no `convert_layout` moves a weight-sized tile (a [BM, BK] activation tile
    made Triton route the whole widened [BN, BK] weight tile through shared memory every step, the reason for the
    per-row unrolling); with PDL, step 0's weights are requested before `griddepcontrol.wait` and the next op is
    released once, after the K loop."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", f"OUT = {str(tmp_path)!r}\n" + _COMPILE], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("fp82", "fp88", "int816"):
        ir = (tmp_path / f"{name}.ttgir").read_text()
        sizes = [int(a) * int(b) * int(c or 1) for a, b, c in
                 re.findall(r"ttg\.convert_layout %\S+ : tensor<(\d+)x(\d+)(?:x(\d+))?x", ir)]
        assert sizes and max(sizes) < 16 * 512, (name, sizes)
        ptx = (tmp_path / f"{name}.ptx").read_text()
        body = ptx[ptx.index(".entry"):]
        first_ld = min(body.find(v) for v in ("ld.global.v4", "ld.global.nc.v4") if v in body)
        wait, release = body.find("griddepcontrol.wait"), body.find("griddepcontrol.launch_dependents")
        assert body.count("griddepcontrol.wait") == 1 and body.count("griddepcontrol.launch_dependents") == 1
        assert -1 < first_ld < wait < release, (name, first_ld, wait, release)
        loop_end = body.rfind("bra.uni")                                      # the K loop's back edge
        assert release > body.rfind("dp4a" if name.startswith("int") else "fma.rn.f32", 0, loop_end)


# ---- native (the H100) -----------------------------------------------------------------------------------------

@pytest.mark.accelerator
@pytest.mark.parametrize("k,n", LLAMA)
@pytest.mark.parametrize("scheme,ms", [("tok", (2, 3, 4, 8)), ("i8", (2, 5, 8, 16))])
def test_rows_llama_shapes_native(k, n, scheme, ms):
    """The row GEMV (default tile, inline-PTX widening / dp4a) at the Llama shapes vs float64; one outlier per row
    in the last K step sets that row's amax."""
    spec = _spec(scheme, n, k, k + n)
    kern = _kernel(spec)
    for m in ms:
        x = _xm(m, k, k + n + m)
        x[torch.arange(m), k - 1 - torch.arange(m)] = -40.0
        assert rel_err(_rows(kern, x), _ref64(spec, x)) < 1e-2, m


@pytest.mark.accelerator
@pytest.mark.parametrize("scheme,gran", [("tok", "tensor"), ("static", "tensor"), ("tok", "channel"),
                                         ("i8", None), ("i8s", None)])
@pytest.mark.parametrize("waves", [2, 32])
def test_rows_modes_native(scheme, gran, waves):
    spec = _spec(scheme, 1000, 2048, waves, gran or "channel")
    kern = _kernel(spec)
    for m in (2, 7):
        x = _xm(m, 2048, waves + m)
        assert rel_err(_rows(kern, x, _cfg(16, 512, waves, 8)), _ref64(spec, x)) < 1e-2, m


@pytest.mark.accelerator
def test_rows_dynamic_per_tensor_native(monkeypatch):
    """Dynamic per-tensor fp8 activations on the row GEMV: the scale of each call's x (found on the device) runs
    the static path, equal to a static kernel given that scale, and to the float64 reference."""
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import ActKind, ActScheme
    from tests._cuda_env import PLATFORM

    monkeypatch.setenv("QUANTRT_CUDA_GEMV_ROWS", "fp8:4")
    base = _spec("tok", 1024, 4096, 21, "tensor")
    spec = LinearSpec(base.weight, ActScheme(ActKind.DYNAMIC_TENSOR, FP8), torch.bfloat16)
    kern = _kernel(spec)
    for m in (2, 3):
        x = _xm(m, 4096, 30 + m, 3.0)
        assert kern._plan(m)[0] == "rows"
        s = x.abs().amax().to(torch.float32).clamp(min=1e-12) / 448.0
        static = TritonW8A8Kernel.prepare(LinearSpec(base.weight, ActScheme(ActKind.STATIC_TENSOR, FP8, scale=s),
                                                     torch.bfloat16), PLATFORM)
        y = kern.apply(x, None)
        assert torch.equal(y, static.apply(x, None))
        assert rel_err(y, _ref64(spec, x)) < 1e-2


@pytest.mark.accelerator
def test_rows_dispatch_in_cuda_graph_native(monkeypatch):
    monkeypatch.setenv("QUANTRT_CUDA_GEMV_ROWS", "fp8:8,i8:16")
    monkeypatch.setenv("QUANTRT_CUDA_RING_W8", "0")      # 4096² at 2-8 rows of fp8 is in ring_w8's tile table
    for scheme in ("tok", "i8"):
        spec = _spec(scheme, 4096, 4096, 5)
        kern = _kernel(spec)
        x = _xm(4, 4096, 5)
        assert kern._plan(4)[0] == "rows"
        y = kern.apply(x, None)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = kern.apply(x, None)
        x.copy_(_xm(4, 4096, 6))
        g.replay()
        assert rel_err(yg, _ref64(spec, x)) < 1e-2 and not torch.equal(y, yg)
