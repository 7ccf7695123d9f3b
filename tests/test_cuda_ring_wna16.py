"""ring_wna16: W4A16 at M <= 32 with the packed words streamed by TMA through a shared-memory ring (Gluon, sm_90).

On the CPU (CI): the reference product, the index algebra that puts the unpacked words in the wgmma A-fragment
order (the kernel's own `_frag_k` / `_col_of_row` and permutations, run on torch tensors), that the kernel
compiles for sm_90 (the triton wheel's ptxas) with no shuffles in it, the dispatch reasons and the error
messages. Natively (`-m accelerator`, an H100): the kernel vs x @ the float64-dequantized weight over M, dtypes,
zero points, ragged tiles and K splits, the TritonWNA16Kernel dispatch at a Llama shape, and CUDA-graph replay.
"""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

from quantrt.quant.kernel import LinearSpec  # noqa: E402
from quantrt.quant.weights import ActScheme  # noqa: E402
from tests._cuda_env import compile_gluon_sm90  # noqa: E402
from tests.test_cuda_kernels import DEV, PLATFORM, TritonWNA16Kernel, make_int_weight, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.experimental.gluon") is None,
    reason="triton with Gluon (>= 3.5) is not installed")


def _packed(n: int, k: int, asym: bool, seed: int, dev=DEV):
    from quantrt.platforms.cuda.kernels.wna16 import pack_int_weight

    w = make_int_weight(n, k, 4, 128, asym, False, torch.Generator().manual_seed(seed))
    packed, scale, zero = pack_int_weight(w, 4, None)
    return w, packed.to(dev), scale.to(dev), (zero.to(dev) if asym else None)


def test_ring_reference_is_x_times_the_dequantized_weight():
    from quantrt.platforms.cuda.kernels.ring_common import ring_reference

    for asym in (False, True):
        w, packed, scale, zero = _packed(64, 384, asym, 1, "cpu")
        x = torch.randn(3, 384, dtype=torch.float64)
        z = w.zero.cpu().double().repeat_interleave(128, 1) if asym else 0.0
        wd = (w.codes.cpu().double() - z) * w.scale.cpu().double().repeat_interleave(128, 1)   # [N, K] float64
        ref = x @ wd.t()
        got = ring_reference(x, packed, scale, zero, 128, 8.0)
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("bn,bk", [(64, 128), (128, 128), (64, 64), (128, 32)])
def test_unpacked_tile_is_the_wgmma_fragment_of_the_permuted_product(bn, bk):
    """Replays the kernel's unpack -> join -> reshape -> permute chain on torch tensors: tile row r / position pos
    must hold code k = _frag_k(pos) of column _col_of_row(r), and the scales must follow the rows."""
    from quantrt.platforms.cuda.kernels import ring_wna16 as R

    rk, nb = bk // 8, bn // 32
    q = torch.randint(0, 16, (bk, bn))                                       # codes [k, n] of one step
    words = torch.zeros(rk, bn, dtype=torch.int64)
    for i in range(8):
        words |= q[i::8] << (4 * i)
    box = words.reshape(rk, nb, 32).permute(1, 0, 2)                         # smem tile [box, j, c]
    c = [(box >> (4 * i)) & 0xF for i in range(8)]                           # the asm's outputs 0..7
    j = lambda a, b: torch.stack((a, b), -1)  # noqa: E731  (gl.join: a new minor axis of 2)
    w = j(j(j(c[0], c[4]), j(c[2], c[6])), j(j(c[1], c[5]), j(c[3], c[7])))
    w = w.reshape(nb, rk // 4, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2)
    wt = w.permute(0, 5, 6, 4, 7, 8, 1, 10, 11, 2, 3, 9).reshape(bn, bk)
    rows = torch.arange(bn)
    cols = R._col_of_row.fn(rows)
    ks = R._frag_k.fn(torch.arange(bk))
    assert sorted(cols.tolist()) == list(range(bn)) and sorted(ks.tolist()) == list(range(bk))
    assert torch.equal(wt, q[ks][:, cols].t())
    s = torch.arange(bn)
    s_rows = s.reshape(nb, 2, 2, 2, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(bn)
    assert torch.equal(s_rows, cols)
    x = torch.randn(8, bk)                                                   # activations [m, k] in k order
    x_pos = x.reshape(8, bk // 32, 2, 2, 2, 2, 2).permute(1, 5, 6, 2, 3, 4, 0).reshape(bk, 8)
    assert torch.equal(x_pos, x[:, ks].t())                                  # the B operand in position order


def _compile_sm90(bn: int, bm: int, dtype: torch.dtype, asym: bool, warps: int = 4, trigger: bool = False,
                  pdl: bool = True, offset: bool = False, split: int = 2, tagged: bool = False, pro: int = 0,
                  rows: int = 1, x_vec: bool = True, div16: bool = False, k: int = 1024, res: bool = False,
                  scale_dtype: torch.dtype = torch.float32, zero_dtype: torch.dtype = torch.float32,
                  trace: bool = False, early: bool = False) -> str:
    from quantrt.platforms.cuda.kernels import ring_wna16 as R
    from quantrt.platforms.cuda.kernels.ring_common import tma_desc

    n, bk = 256, 128
    x = torch.zeros(1, k, dtype=dtype)
    packed = torch.zeros(k // 8, n, dtype=torch.int32)
    scale, zero = torch.zeros(k // 128, n, dtype=scale_dtype), torch.zeros(k // 128, n, dtype=zero_dtype)
    ws, cnt = (torch.zeros(8, dtype=torch.int64),) * 2 if tagged else (zero, packed)
    p_desc = tma_desc(packed, [n // 32, k // 8, 32], [32, n, 1], [bn // 32, bk // 8, 32], swizzle=128)
    s_desc = tma_desc(scale, [scale.numel()], [1], [bn])
    z_desc = tma_desc(zero, [zero.numel()], [1], [bn])
    layouts = R.launch_layouts(R.RingConfig(block_n=bn, block_k=bk, block_m=bm, warps=warps, x_vec=x_vec))
    return compile_gluon_sm90(R._ring_w4_kernel, [
        x, p_desc, s_desc, z_desc, x, ws, cnt, rows, n, k, k, 128, 8.0, *_pro_args(pro, rows, k, x),
        -(-k // bk // split) * bk, bn, bk, bm, 3, split, dtype == torch.bfloat16, asym or offset, pdl, x_vec, *layouts,
        trigger, offset, tagged, *_pro_consts(pro, rows, k, warps), res, torch.zeros(8, dtype=torch.int64), 7, trace,
        early],
        num_warps=warps, div16=div16)


def _pro_args(pro: int, rows: int, k: int, x: torch.Tensor) -> list:
    """The kernel's prologue / residual-epilogue arguments after ZC: d, nw, r, their strides, eps, the partials'
    count, the epilogue's residual and partials (stand-ins where unused)."""
    d = torch.zeros(rows, 32) if pro == 4 else x
    return [d, x, x, d.shape[1] if pro == 4 else k, k, 1e-6, 32 if pro == 4 else 0, x, torch.zeros(rows, 8)]


def _pro_consts(pro: int, rows: int, k: int, warps: int) -> list:
    """The kernel's prologue constexprs (PRO, NR, KP, ROW) as `ring_wna16._prologue_opts` makes them."""
    from quantrt.platforms.cuda.kernels.ring_prologue import RingPrologue
    from quantrt.platforms.cuda.kernels.ring_wna16 import _prologue_opts

    if pro == 0:
        return [0, 1, 1024, None]
    d = torch.zeros(rows, k)
    o = _prologue_opts(RingPrologue(pro, d, d[0], d, parts=torch.zeros(rows, 32)), rows, k, warps)
    return [o["PRO"], o.get("NR", 1), o.get("KP", 1024), o.get("ROW")]


@pytest.mark.parametrize("bn,bm,dtype,asym,warps", [
    (64, 8, torch.bfloat16, False, 4), (128, 16, torch.float16, True, 4), (128, 32, torch.bfloat16, False, 8)])
@pytest.mark.gluon_compile
def test_kernel_compiles_for_sm90_without_shuffles(bn, bm, dtype, asym, warps):
    ptx = _compile_sm90(bn, bm, dtype, asym, warps)
    assert "cp.async.bulk.tensor.3d" in ptx and "mbarrier.try_wait" in ptx
    assert ptx.index("cp.async.bulk.tensor") < ptx.index("griddepcontrol.wait")  # the ring fills before the wait
    # per 64 rows of a warpgroup and k16 of a step, A in registers (8 warps: each warpgroup its own 64 rows)
    assert ptx.count("wgmma.mma_async") == (bn // 64) // (warps // 4) * (128 // 16)
    assert f"m64n{bm}k16" in ptx
    assert "shfl" not in ptx                                     # the fragment and scale permutations move no data
    assert ptx.count("lop3.b32") >= 4 * (bn * 16 // 128) // (warps // 4)   # one LOP3 per code pair


@pytest.mark.parametrize("pro", [0, 4])
@pytest.mark.gluon_compile
def test_group_index_of_a_step_is_a_shift(pro):
    """The scale group G is a constexpr: a step's group k0 // G is a shift, not the float-reciprocal integer
    division a runtime G compiles to (I2F, MUFU.RCP, F2I before every step's copy issue; 0.5% of the int4
    batch-1 step on the H100)."""
    ptx = _compile_sm90(128, 8, torch.bfloat16, False, split=2, tagged=True, pro=pro, x_vec=pro == 0)
    assert "div.s32" not in ptx and "div.u32" not in ptx and "rcp.approx" not in ptx


@pytest.mark.parametrize("sdt,asym,bn", [(torch.float16, False, 128), (torch.bfloat16, True, 128),
                                         (torch.float16, True, 64)])
@pytest.mark.gluon_compile
def test_compact_scales_and_zeros_stream_fewer_bytes(sdt, asym, bn):
    """The compact weight (`pack_int_weight(compact=True)`): the scale box is a 16-bit TMA copy and the zero box
    uint8 (a step's expected bytes drop by BN * 2, and BN * 3 more with zeros), widened to fp32 in registers; the
    MMAs are the fp32 kernel's (64 uint8 zeros take every other 64-byte row of their ring: TMA writes 128-byte
    aligned rows)."""
    ptx = _compile_sm90(bn, 8, torch.bfloat16, asym, scale_dtype=sdt, zero_dtype=torch.uint8)
    plain = _compile_sm90(bn, 8, torch.bfloat16, asym)
    assert ptx.count("wgmma.mma_async") == plain.count("wgmma.mma_async") > 0
    words = bn * 128 // 2                                           # a step's [BN, BK] 4-bit codes

    def expected(src: str) -> set[int]:
        return {int(v) for v in re.findall(r"expect_tx\S* _, \[%r\d+\], (\d+);", src)}

    assert expected(ptx) == {words + 2 * bn + (bn if asym else 0)}
    assert expected(plain) == {words + 4 * bn + (4 * bn if asym else 0)}
    assert ("cvt.f32.f16" if sdt == torch.float16 else "cvt.f32.bf16") in ptx


@pytest.mark.parametrize("bn,bm,warps", [(64, 8, 4), (128, 16, 8)])
@pytest.mark.gluon_compile
def test_offset_variant_compiles_with_the_same_mmas(bn, bm, warps):
    """Float offsets: the step's sum of x per row comes from a register reduction (no extra MMA)."""
    ptx = _compile_sm90(bn, bm, torch.bfloat16, False, warps, offset=True)
    plain = _compile_sm90(bn, bm, torch.bfloat16, True, warps)
    assert ptx.count("wgmma.mma_async") == plain.count("wgmma.mma_async") > 0
    assert f"m64n{bm}k16" in ptx and "cp.async.bulk.tensor.3d" in ptx


@pytest.mark.parametrize("bn", [64, 128])
@pytest.mark.gluon_compile
def test_few_rows_split_k_epilogue_is_tagged_words_without_atomics_or_fences(bn):
    """M <= 2 with split K: the partials are 64-bit words with the tag in the high half, read back by the last
    split with volatile loads; no arrival counter (atomics), no gpu-scope fence, and no register spills (the splits
    ride the tile's BM axis, so the gather costs one partial's registers)."""
    ptx = _compile_sm90(bn, 8, torch.bfloat16, False, split=9, tagged=True)
    assert "st.global.b64" in ptx and "ld.volatile.global.b64" in ptx and "4294967296" in ptx
    assert "atom." not in ptx and "membar" not in ptx and "fence.acq_rel" not in ptx and "fence.sc" not in ptx
    assert "local" not in ptx                                    # nothing spilled to local memory
    plain = _compile_sm90(bn, 8, torch.bfloat16, False, split=9)   # M > 2: the last-arriver counter
    assert "ld.volatile" not in plain and "atom." in plain


def test_tagged_partials_grow_outside_capture_only(monkeypatch):
    """The shared words grow to what a launch needs, keep the older buffers alive (graphs captured on them still
    replay), and refuse to grow during CUDA-graph capture with a message that says what to do."""
    from quantrt.platforms.cuda.kernels import ring_common as R

    monkeypatch.setattr(R, "_PARTIALS", {})
    cpu = torch.device("cpu")
    a = R.tagged_partials(cpu, 1000)
    assert a.dtype == torch.int64 and a.numel() >= 1000 and int(a.abs().sum()) == 0
    assert R.tagged_partials(cpu, a.numel()) is a
    b = R.tagged_partials(cpu, a.numel() + 1)
    held = R._PARTIALS[("cpu", 0)]
    assert b.numel() >= 2 * a.numel() and len(held) == 2 and held[0] is a and held[1] is b
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="must grow to .* during CUDA-graph capture; run the step once eagerly"):
        R.tagged_partials(torch.device("cuda", 0), 10 ** 9)
    assert ("cuda", 0) not in R._PARTIALS or not R._PARTIALS[("cuda", 0)]


def test_ring_reference_with_offsets_is_x_times_q_s_plus_o():
    from quantrt.platforms.cuda.kernels.ring_common import ring_reference

    gen = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (256, 64), generator=gen)
    packed = sum((q[i::8] << (4 * i)) for i in range(8))
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)             # [K/8, N]
    s, o = torch.rand(2, 64, generator=gen), torch.randn(2, 64, generator=gen)
    x = torch.randn(3, 256, generator=gen)
    w = q.double() * s.double().repeat_interleave(128, 0) + o.double().repeat_interleave(128, 0)
    assert torch.allclose(ring_reference(x, packed, s, o, 128, offset=True), x.double() @ w)


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.gluon_compile
def test_pdl_trigger_after_the_main_loop(pdl):
    """With TRIGGER, launched with PDL or not, the next PDL op is released once, after the last MMA of the K loop
    and before the split-K epilogue; with PDL the first weight copies are issued before the wait for x."""
    ptx = _compile_sm90(64, 8, torch.bfloat16, False, trigger=True, pdl=pdl)
    assert ptx.count("griddepcontrol.launch_dependents") == 1
    assert ptx.rindex("wgmma.mma_async") < ptx.index("griddepcontrol.launch_dependents") < ptx.index("atom.")
    if pdl:
        assert ptx.index("cp.async.bulk.tensor") < ptx.index("griddepcontrol.wait") < ptx.index("wgmma.mma_async")
    else:
        assert "griddepcontrol.wait" not in ptx
    assert "griddepcontrol" not in _compile_sm90(64, 8, torch.bfloat16, False, trigger=False, pdl=False)


@pytest.mark.gluon_compile
def test_early_release_at_the_start():
    """EARLY_RELEASE (the next op is small and reads before its own wait: q/k/v before the decode attention): the
    next PDL op is released once, after the first weight copies are issued and before the wait for x."""
    ptx = _compile_sm90(64, 8, torch.bfloat16, False, early=True, pdl=True)
    assert ptx.count("griddepcontrol.launch_dependents") == 1
    assert (ptx.index("cp.async.bulk.tensor") < ptx.index("griddepcontrol.launch_dependents")
            < ptx.index("griddepcontrol.wait") < ptx.index("wgmma.mma_async"))


def test_can_run_and_errors_name_the_problem():
    from quantrt.platforms.cuda.kernels.ring_wna16 import RingConfig, can_run, default_config, ring_wna16

    assert can_run(16, 4096, 4096, 128, 4, torch.bfloat16) == (True, "")
    assert "8-bit container" in can_run(1, 4096, 4096, 128, 8, torch.bfloat16)[1]
    assert can_run(32, 4096, 4096, 128, 4, torch.bfloat16) == (True, "")
    assert "M=33 is outside 1..32" in can_run(33, 4096, 4096, 128, 4, torch.bfloat16)[1]
    assert "M=17 is outside 1..16" in can_run(17, 4096, 4096, 128, 4, torch.bfloat16, RingConfig(block_m=16))[1]
    assert "M=9 is outside 1..8" in can_run(9, 4096, 4096, 128, 4, torch.bfloat16, RingConfig(block_m=8))[1]
    assert "not bf16/fp16" in can_run(1, 4096, 4096, 128, 4, torch.float32)[1]
    assert "group 64 must be multiples of block_k 128" in can_run(1, 4096, 4096, 64, 4, torch.bfloat16)[1]
    assert "N=48 is not a multiple of 32" in can_run(1, 48, 4096, 128, 4, torch.bfloat16)[1]
    assert default_config(1, 4096, 4096).block_n == 128 and default_config(16, 8192, 8192).block_m == 16
    assert default_config(17, 8192, 8192).block_m == 32 and default_config(32, 28672, 4096).warps == 8
    with pytest.raises(ValueError, match=r"ring_wna16 runs 1 <= M <= 32; got M=0"):
        default_config(0, 64, 128)
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    p, s = torch.zeros(32, 48, dtype=torch.int32), torch.zeros(2, 48)
    with pytest.raises(ValueError, match=r"ring_wna16 cannot run this call: N=48 is not a multiple of 32"):
        ring_wna16(x, p, s, None, 128)
    p, s = torch.zeros(32, 64, dtype=torch.int32), torch.zeros(2, 64)
    with pytest.raises(ValueError, match=r"needs block_n 64/128"):
        ring_wna16(x, p, s, None, 128, cfg=RingConfig(block_n=32))
    with pytest.raises(ValueError, match=r"warps 4, or 8 with block_n 128"):
        ring_wna16(x, p, s, None, 128, cfg=RingConfig(block_n=64, warps=8))


def test_ring_tiles_env_overrides_entries_and_names_a_bad_one(monkeypatch):
    """QUANTRT_CUDA_RING_TILES (A/B runs) replaces the named (bucket, K, N) entries only; a malformed entry is an
    error that shows the expected form."""
    from quantrt.platforms.cuda.kernels.ring_wna16 import RingConfig, default_config

    plain = default_config(1, 6144, 4096)
    monkeypatch.setenv("QUANTRT_CUDA_RING_TILES", "1:4096:4096=64:128:3:1:0:8+8:4096:6144=128:128:2:2:0:8:False:True:8")
    assert default_config(1, 4096, 4096) == RingConfig(64, 128, 3, 1, 0, 8)
    assert default_config(4, 6144, 4096) == RingConfig(128, 128, 2, 2, 0, 8, False, True, 8)
    assert default_config(1, 6144, 4096) == plain
    for bad in ("1:4096=64:128", "1:4096:4096=", "1:4096:4096=64:x"):
        monkeypatch.setenv("QUANTRT_CUDA_RING_TILES", bad)
        with pytest.raises(ValueError, match=r"QUANTRT_CUDA_RING_TILES entry .* is not 'b:K:N=block_n:block_k"):
            default_config(1, 4096, 4096)


def test_dispatch_says_why_the_ring_kernel_is_not_used():
    from quantrt.platforms.cuda.kernels.wna16 import _ring_why

    gen = torch.Generator().manual_seed(0)
    w4 = make_int_weight(64, 256, 4, 128, False, False, gen)
    if DEV == "cpu":
        assert _ring_why(w4, 4, torch.device("cpu")) == "not a CUDA device (Gluon/TMA kernel)"
    assert _ring_why(w4, 8, torch.device(DEV)) == "8-bit container"
    assert _ring_why(make_int_weight(48, 256, 4, 128, False, False, gen), 4, torch.device(DEV)) == \
        "N=48 not a multiple of 32"
    assert _ring_why(make_int_weight(64, 256, 4, 64, False, False, gen), 4, torch.device(DEV)) == \
        "group size 64 / K=256 not a multiple of 128"


# ---- natively on the H100 ------------------------------------------------------------------------------------
# RingConfig(block_n, block_k, stages, waves, split_k, block_m, pdl, x_vec, warps)
@pytest.mark.accelerator
@pytest.mark.parametrize("m,dtype,asym,cfg", [
    (1, torch.bfloat16, False, None),
    (1, torch.float16, True, None),
    (3, torch.bfloat16, True, (64, 128, 2, 4, 3, 8)),       # 3 ragged splits of K = 640 (2, 2, 1 steps)
    (7, torch.float16, False, (64, 128, 2, 4, 0, 8, False, False)),   # activations gathered in _frag_k order
    (2, torch.bfloat16, True, (64, 128, 2, 4, 0, 8, True)),  # programmatic dependent launch
    (8, torch.float16, False, (128, 128, 4, 1, 0, 8)),      # BN 128: N = 96 leaves a masked half tile
    (9, torch.bfloat16, False, None),
    (16, torch.float16, True, (64, 128, 3, 2, 5, 16)),      # one step per split
    (5, torch.bfloat16, True, (64, 64, 6, 2, 0, 8)),        # BK 64, ring deeper than the slice
    (32, torch.float16, False, None),                       # the M <= 32 bucket's default (BM 32)
    (17, torch.bfloat16, True, (64, 128, 2, 4, 3, 32)),     # BM 32, 3 ragged splits
    (24, torch.bfloat16, True, (128, 128, 2, 1, 0, 32, False, True, 8)),   # two warpgroups; N = 96: one masked
    (6, torch.float16, False, (128, 128, 3, 1, 2, 8, False, True, 8)),     # two warpgroups at BM 8
])
def test_ring_wna16_native(m, dtype, asym, cfg):
    from quantrt.platforms.cuda.kernels.ring_wna16 import RingConfig, ring_wna16

    w, packed, scale, zero = _packed(96, 640, asym, m)
    x = torch.randn(m, 640, generator=torch.Generator().manual_seed(m)).to(DEV, dtype)
    y = ring_wna16(x, packed, scale, zero, 128, 8.0, RingConfig(*cfg) if cfg else None)
    ref = x.double() @ w.dequantize().double().t()
    assert y.dtype == dtype and y.shape == (m, 96)
    assert rel_err(y, ref) < 2e-3


@pytest.mark.accelerator
@pytest.mark.parametrize("m,asym,act_order", [(1, False, False), (4, True, False), (16, False, True), (20, True, True),
                                              (32, False, False)])
def test_wna16_dispatch_runs_the_ring_kernel_at_a_llama_shape(m, asym, act_order):
    w = make_int_weight(6144, 4096, 4, 128, asym, act_order, torch.Generator().manual_seed(m))
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.bfloat16), PLATFORM)
    assert kern.ring_why == ""
    x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(7)).to(DEV, torch.bfloat16)
    ref = x.double() @ w.dequantize().double().t()
    assert rel_err(kern.apply(x, None), ref) < 2e-3


@pytest.mark.accelerator
@pytest.mark.parametrize("m,dtype,cfg", [(1, torch.bfloat16, None), (5, torch.float16, (64, 128, 2, 4, 3, 8)),
                                         (16, torch.bfloat16, None), (24, torch.float16, None),
                                         (8, torch.bfloat16, (128, 128, 3, 1, 2, 8, False, True, 8))])
def test_ring_wna16_float_offsets_native(m, dtype, cfg):
    from quantrt.platforms.cuda.kernels.ring_common import ring_reference
    from quantrt.platforms.cuda.kernels.ring_wna16 import RingConfig, ring_wna16

    gen = torch.Generator().manual_seed(m)
    _, packed, scale, _ = _packed(96, 640, False, m)
    off = (-(torch.rand(scale.shape, generator=gen) * 8 + 0.5) * scale.cpu()).to(DEV)
    x = torch.randn(m, 640, generator=gen).to(DEV, dtype)
    y = ring_wna16(x, packed, scale, off, 128, cfg=RingConfig(*cfg) if cfg else None, offset=True)
    assert rel_err(y, ring_reference(x, packed, scale, off, 128, offset=True)) < 2e-3


@pytest.mark.accelerator
def test_ring_wna16_replays_in_a_cuda_graph():
    from quantrt.platforms.cuda.kernels.ring_wna16 import ring_wna16

    _, packed, scale, zero = _packed(4096, 4096, True, 3)
    x = torch.randn(2, 4096, device=DEV, dtype=torch.bfloat16)
    eager = ring_wna16(x, packed, scale, zero, 128)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = ring_wna16(x, packed, scale, zero, 128)
    x.copy_(torch.randn_like(x))
    eager2 = ring_wna16(x, packed, scale, zero, 128)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager2) and not torch.equal(y, eager)


@pytest.mark.accelerator
def test_split_k_partials_are_exact_and_left_zero_over_many_launches():
    """Back-to-back PDL launches at one and two rows with 2-32 splits (up to 4 gather rounds a row) share the tagged
    partial words, with an M = 3 launch (the counter epilogue) between them: every result equals the same product
    with one split (and itself, bit for bit, launch after launch), and the words are zero once the stream is idle."""
    from dataclasses import replace

    from quantrt.platforms.cuda.kernels.ring_common import _PARTIALS
    from quantrt.platforms.cuda.kernels.ring_wna16 import default_config, ring_wna16

    cases = []
    for m, k, n in [(1, 4096, 4096), (3, 14336, 4096), (1, 4096, 256), (2, 4096, 256), (1, 14336, 4096),
                    (2, 14336, 4096), (1, 4096, 28672)]:
        _, packed, scale, zero = _packed(n, k, m % 2 == 1, m + n)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(DEV, torch.bfloat16)
        cfg = replace(default_config(m, n, k), pdl=True)
        cases.append((x, packed, scale, zero, cfg, ring_wna16(x, packed, scale, zero, 128, cfg=cfg)))
    for _ in range(20):
        outs = [ring_wna16(x, p, s, z, 128, cfg=c) for x, p, s, z, c, _ in cases]
    torch.cuda.synchronize()
    for (x, p, s, z, c, first), y in zip(cases, outs):
        assert torch.equal(y, first)
        one = ring_wna16(x, p, s, z, 128, cfg=replace(c, split_k=1))
        assert rel_err(y, one.double()) < 1e-2
    assert all(int(b.abs().sum()) == 0 for b in _PARTIALS[("cuda", torch.device(DEV).index or 0)])
