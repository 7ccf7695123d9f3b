"""A decode step's rotary + KV write + paged attention in one launch (`decode_attention_op.decode_rotary_attention`,
`Platform.decode_rotary_attention_op` on CUDA) against the two launches it replaces (`rotary_kv_store`, then
`paged_decode_attention` on the rotated q): bit-equal outputs and pages for every KV format, with splits, a
sliding window and sinks; what it declines leaves the pool untouched. Triton's interpreter without a GPU;
`-m accelerator` at Llama-3.1-8B attention shapes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests._cuda_env import DEV, NEEDS_TRITON
from tests.test_cuda_fused_layer import KV, _pool, _qkv, _rope_tables

pytestmark = NEEDS_TRITON


def _step(kv: str, lens: list[int], h: int, hkv: int, d: int, seed: int):
    """A pool holding each sequence's history (lens[i] - 1 tokens) and the step's inputs for the new token."""
    gen = torch.Generator().manual_seed(seed)
    b, n = len(lens), sum(lens) + 8
    perm = torch.randperm(n, generator=gen)
    seqs = [perm[sum(lens[:i]):sum(lens[:i]) + m].to(DEV) for i, m in enumerate(lens)]
    ks, vs = (1.0, 1.0) if kv == "bf16" else (0.5, 2.0)
    pools = _pool(kv, hkv, d, n), _pool(kv, hkv, d, n)
    hist_k, hist_v = torch.randn(n, hkv, d, generator=gen).to(DEV) * 2, torch.randn(n, hkv, d, generator=gen).to(DEV)
    for p in pools:
        p.write(0, torch.arange(n, device=DEV), hist_k, hist_v, ks, vs)
    kv_slots = torch.zeros(b, max(lens), dtype=torch.int64, device=DEV)
    for i, s in enumerate(seqs):
        kv_slots[i, : len(s)] = s
    q, k, v = _qkv(b, h, hkv, d, torch.bfloat16, seed)
    rope = _rope_tables(d, max(256, max(lens)), torch.bfloat16)   # every position's row (past it: out of bounds)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEV)
    positions = (lens_t - 1).long()
    out_slots = torch.stack([s[-1] for s in seqs])
    return pools, kv_slots, lens_t, positions, out_slots, (q, k, v), rope, (ks, vs)


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("window,sink,splits", [(None, False, 1), (None, False, 3), (20, True, 0)])
@pytest.mark.parametrize("early", ["1", "0"])
def test_one_launch_equals_rotary_store_then_attention(kv, window, sink, splits, early, monkeypatch):
    """early "1" (the default, for grids that leave SMs idle): on plain pages the first key block is read before the
    new token's row is written, which then comes from registers in every block (the pages hold stale values at the
    new slot here)."""
    from quantrt.platforms.cuda.kernels import paged_attention_triton as P
    from quantrt.platforms.cuda.kernels.paged_attention_triton import (
        NewToken,
        kv_format,
        paged_decode_attention,
    )
    from quantrt.platforms.cuda.kernels.rope_kv_triton import pool_format, rotary_kv_store

    monkeypatch.setenv("QUANTRT_CUDA_ATTN_EARLY", early)
    monkeypatch.setattr(P, "EARLY_MAX_PROGRAMS", 1000)  # the early reads serve small grids: all here
    h, hkv, d = 4, 2, 32
    lens = [1, 33, 70]          # new tokens at chunk starts: position 0, and 32 (3 splits of 32 keys)
    pools, kv_slots, lens, positions, out_slots, (q, k, v), rope, (ks, vs) = _step(kv, lens, h, hkv, d, 7)
    cos, sin = rope.half_tables()
    sinks = torch.randn(h, generator=torch.Generator().manual_seed(1)).to(DEV) if sink else None
    two, one = pools
    fmt, _ = kv_format(two)
    kw = dict(window=window, k_scale=ks, v_scale=vs, sinks=sinks, splits=splits, block_l=16)
    sc = (lambda p: (p.k_sc[0], p.v_sc[0])) if kv == "fp4_e2m1" else (lambda p: (None, None))
    qr = rotary_kv_store(q, k, v, cos, sin, positions, two, 0, out_slots, ks, vs)
    ref = paged_decode_attention(qr, two.k[0], two.v[0], kv_slots, lens, d ** -0.5, fmt, **dict(kw, k_sc=sc(two)[0],
                                                                                              v_sc=sc(two)[1]))
    new = NewToken(k, v, cos, sin, positions, out_slots, pool_format(one)[0])
    got = paged_decode_attention(q, one.k[0], one.v[0], kv_slots, lens, d ** -0.5, fmt, new=new,
                                 **dict(kw, k_sc=sc(one)[0], v_sc=sc(one)[1]))
    assert torch.equal(got, ref)
    for a, b in [(one.k[0], two.k[0]), (one.v[0], two.v[0])] + list(zip(one.k_sc + one.v_sc, two.k_sc + two.v_sc)):
        assert torch.equal(a, b)


_COMPILE = r'''
import torch
from quantrt.platforms.cuda.kernels.paged_attention_triton import _decode_kernel
from tests._sm90 import compile_sm90

bf, i32 = torch.bfloat16, torch.int32
q, pages, f32 = torch.zeros(1, 32, 128, dtype=bf), torch.zeros(64, 8, 128, dtype=bf), torch.zeros(1)
slots, lens, pos, cs = torch.zeros(1, 256, dtype=i32), torch.zeros(1, dtype=i32), torch.zeros(1, dtype=torch.int64), \
    torch.zeros(256, 64)
for early in (False, True):
    vals = [q, pages, pages, pages, pages, slots, lens, f32, f32, f32, q, 256, 0.1, 1.0, 256, 0, q, q, cs, cs, pos, pos,
            6144, 128, 6144, 128, 6144, 128, 64, 1.0, 1.0, 0, 8, 4, 16, 128, 64, 0, False, True, True, True, True, 0,
            None, 0, False, early]
    ptx = compile_sm90(_decode_kernel, vals, num_warps=8, div16=True, gluon=False, options={"num_stages": 2})
    body = ptx[ptx.index(".entry"):]
    wait, rel = body.index("griddepcontrol.wait"), body.index("griddepcontrol.launch_dependents")
    print("EARLY" if early else "PLAIN", wait, rel, body[:wait].count("ld.global"), body[wait:].count("ld.global"))
'''


def test_early_reads_go_out_before_the_wait_and_the_release_after_it():
    """sm_90 PTX (the triton wheel's ptxas, a subprocess without TRITON_INTERPRET): on plain pages with the rotary
    the length, position, slot, rope row and first key block are requested before `griddepcontrol.wait`; otherwise
    nothing is read before it. Either way the next op is released after the wait (the q/k/v kernel may have
    released this one at its start, and the o projection must not start streaming beside it)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in r.stdout.splitlines()
            if line.startswith(("EARLY", "PLAIN"))}
    wait, rel, before, after = rows["PLAIN"]
    assert wait < rel and before == 0 and after > 0
    wait, rel, before, after = rows["EARLY"]
    assert wait < rel and before >= 8 and after > 0     # len, pos, slot, 4 slot-table words, keys, values, cos, sin


def _layer(d: int, window=None):
    return SimpleNamespace(head_dim=d, layer_id=0, scale=d ** -0.5, window=window, k_scale=1.0, v_scale=1.0)


def test_platform_op_serves_decode_and_declines_without_writing():
    from quantrt.platforms.cuda.kernels.decode_attention_op import (
        decode_attention,
        decode_rotary_attention,
    )
    from quantrt.platforms.cuda.kernels.rope_kv_triton import rotary_kv_store
    from tests._cuda_env import PLATFORM

    assert PLATFORM.decode_rotary_attention_op() is decode_rotary_attention
    h, hkv, d = 4, 2, 32
    pools, kv_slots, lens, positions, out_slots, (q, k, v), rope, _ = _step("bf16", [9, 3], h, hkv, d, 3)
    cos, sin = rope.half_tables()
    fbs = [SimpleNamespace(kv_pool=p, kv_lens_t=lens, kv_slots=kv_slots, positions=positions, out_slots=out_slots,
                           cache={}) for p in pools]
    layer = _layer(d)
    got = decode_rotary_attention(layer, q, k, v, cos, sin, fbs[0])
    qr = rotary_kv_store(q, k, v, cos, sin, positions, pools[1], 0, out_slots)
    assert torch.equal(got, decode_attention(layer, qr, fbs[1])) and got.shape == (2, h * d)
    before = pools[0].k[0].clone()
    assert decode_rotary_attention(layer, q.float(), k.float(), v.float(), cos, sin, fbs[0]) is None  # fp32 q
    assert decode_rotary_attention(layer, q[:, :, :24], k[:, :, :24], v[:, :, :24], cos, sin, fbs[0]) is None
    assert torch.equal(pools[0].k[0], before)


@pytest.mark.accelerator
@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("b", [1, 64])
def test_one_launch_llama8b_shapes_native(kv, b):
    from quantrt.platforms.cuda.kernels.paged_attention_triton import (
        NewToken,
        kv_format,
        paged_decode_attention,
    )
    from quantrt.platforms.cuda.kernels.rope_kv_triton import pool_format, rotary_kv_store

    h, hkv, d = 32, 8, 128
    lens = [int(x) for x in torch.randint(1, 200, (b,), generator=torch.Generator().manual_seed(b))]
    pools, kv_slots, lens_t, positions, out_slots, (q, k, v), rope, (ks, vs) = _step(kv, lens, h, hkv, d, b)
    cos, sin = rope.half_tables()
    two, one = pools
    fmt, _ = kv_format(two)
    sc = (lambda p: dict(k_sc=p.k_sc[0], v_sc=p.v_sc[0])) if kv == "fp4_e2m1" else (lambda p: {})
    qr = rotary_kv_store(q, k, v, cos, sin, positions, two, 0, out_slots, ks, vs)
    ref = paged_decode_attention(qr, two.k[0], two.v[0], kv_slots, lens_t, d ** -0.5, fmt, None, ks, vs, **sc(two))
    new = NewToken(k, v, cos, sin, positions, out_slots, pool_format(one)[0])
    got = paged_decode_attention(q, one.k[0], one.v[0], kv_slots, lens_t, d ** -0.5, fmt, None, ks, vs, new=new,
                                 **sc(one))
    assert torch.equal(got, ref)
    assert torch.equal(one.k[0], two.k[0]) and torch.equal(one.v[0], two.v[0])
