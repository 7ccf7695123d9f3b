"""Triton paged decode attention over the slot-indexed KV pool (bf16/fp16, fp8 bits, packed fp4).

One query token per sequence. Grid (B, Hkv, S): a program takes the G = H / Hkv query heads of one KV
head as the rows of a [GP >= 16, D] tile (GQA without expanding K/V) and one of S contiguous chunks of
the sequence's slot table; it reads K/V rows by slot, decodes them to the compute dtype in registers,
and runs an online softmax with fp32 scores, fp32 running max / sum and an fp32 P.V accumulator.
A second kernel combines the S partials (split-KV, two-level reduction) and adds attention sinks; with one
split and no sinks (short contexts, large batches) the decode kernel normalises its own output: one launch.

KV formats (KV_FMT), all decoded exactly into bf16/fp16 operands of tl.dot:
  0 plain  pool dtype == compute dtype;
  1 e4m3fn / 3 e4m3fnuz uint8 bits: sign + 7 bits placed at fp16 bits 7..15 read as value * 2**-8
    (fnuz: 2**-7); the power of two and the per-tensor k/v scale multiply the fp32 scores / output;
  2 e5m2   uint8 bits: (b << 8) is the fp16 itself;
  4 fp4    packed e2m1 [slots, Hkv, D/2] (even element in the low nibble) and one scale byte
    2**(b-127) per 16 elements of the flattened Hkv*D row (engine/kv_quant.py); e2m1 is decoded with
    the fp16 trick of fp4_triton (value * 2**-14), the block scale times 2**14 is exact in fp32.
Masking: keys j < kv_len and, with a sliding window W, j > kv_len - 1 - W (ForwardBatch.decode_mask).
kv_lens is read on the device, so a CUDA graph replays the launch for any lengths within the bucket.
Both kernels are launched like the per-layer ops (`pdl_triton.pdl_row_opts`: PDL on sm_90+ from PDL_MIN_ROWS
sequences): scheduled while the kernel before drains, they wait for it before reading anything. The decode kernel
releases the op after it once its wait is over, not at its start, since the q/k/v kernel releases it early
(`LinearKernel.release_early`, only while `decode_attention_op._small_grid`). On a small grid (EARLY_MAX_PROGRAMS: one or two
sequences over a slot table of up to 256 keys) on plain or fp8 pages with the rotary fused (EARLY), it requests
what no op of the step writes before the wait: the length, position, out slot, rope row and the first key block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantrt.engine.kv_quant import KVKind
from quantrt.platforms.cuda.kernels._common import cdiv, interpret_mode, num_sms
from quantrt.platforms.cuda.kernels.pdl_triton import pdl_enter, pdl_release, pdl_row_opts, pdl_wait
from quantrt.platforms.cuda.kernels.rope_kv_triton import (
    add_bias,
    fp8_encode,
    qk_norm,
    rope_apply,
    rope_cols,
    rope_kv_rows,
    rope_store_kv,
    store_kv,
)
from quantrt.platforms.cuda.kernels.trace import t_done, t_rec, t_stamp, trace_slot
from quantrt.platforms.cuda.layer_ops import rne

_NEG = tl.constexpr(-1.0e30)  # a global read inside @triton.jit must be a constexpr
_FP8_FMT = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2, torch.float8_e4m3fnuz: 3}
_FMT_FACTOR = {0: 1.0, 1: 256.0, 2: 1.0, 3: 128.0, 4: 1.0}
BLOCK_L = 64    # keys per block (`paged_decode_attention`'s default)
# The early path (reads before the PDL wait, `EARLY`; the q/k/v kernel releasing the attention at its start,
# `_small_grid`) up to this many programs. H100 int4, median ms a step, early path on / off: one key split at batch
# 1 / 2 (8 / 16 programs) 2.02 / 2.10, 2.32 / 2.37; a 2000-token context, 8 key splits (64 / 128 programs), 2.43 /
# 2.35, 2.82 / 2.72; batch 64 (512 programs) cost 2-4%.
EARLY_MAX_PROGRAMS = 16


@triton.jit
def _fp8_bits(b, FMT: tl.constexpr):
    """uint8 fp8 bits (as int32) -> fp16 value (times 2**-8 for e4m3fn, 2**-7 for e4m3fnuz)."""
    if FMT == 2:
        h = b << 8
    else:
        h = ((b & 0x7F) << 7) | ((b & 0x80) << 8)
    return h.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _e2m1(n):
    h = ((n & 7) << 9) | ((n & 8) << 12)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _load_kv(buf_ptr, sc_ptr, slots, mask_l, kvh, HKV: tl.constexpr, D: tl.constexpr, BL: tl.constexpr,
             FMT: tl.constexpr):
    """[BL, D] rows of one KV head at `slots`: the stored dtype (plain), fp16 (fp8, times the format's power
    of two) or fp32 (fp4); every value is exact in bf16/fp16, the caller casts."""
    s64 = slots.to(tl.int64)
    if FMT == 4:
        DH: tl.constexpr = D // 2
        NB: tl.constexpr = HKV * D // 16
        offs_h = tl.arange(0, DH)
        b = tl.load(buf_ptr + s64[:, None] * (HKV * DH) + kvh * DH + offs_h[None, :], mask=mask_l[:, None],
                    other=0).to(tl.int32)                                          # [BL, D/2]
        v = tl.reshape(tl.join(_e2m1(b & 15), _e2m1(b >> 4)), [BL, D // 16, 16])   # even element first
        offs_b = tl.arange(0, D // 16)
        sb = tl.load(sc_ptr + s64[:, None] * NB + kvh * (D // 16) + offs_b[None, :], mask=mask_l[:, None],
                     other=127).to(tl.int32)
        sc = (sb << 23).to(tl.float32, bitcast=True) * 16384.0                    # 2**(b-127) * 2**14
        return tl.reshape(v * sc[:, :, None], [BL, D])
    offs_d = tl.arange(0, D)
    x = tl.load(buf_ptr + s64[:, None] * (HKV * D) + kvh * D + offs_d[None, :], mask=mask_l[:, None], other=0)
    if FMT == 0:  # native Triton compiles every return of a static-if chain: one type (fp32, exact) for all
        return x.to(tl.float32)
    return _fp8_bits(x.to(tl.int32), FMT).to(tl.float32)


@triton.jit
def _scores(q, k, j0, lo, hi, qk_scale, m_i, l_i, BL: tl.constexpr, DOT_F32: tl.constexpr):
    """q against one block of keys k [BL, D] (q's dtype) at slot-table columns j0.. (outside [lo, hi) masked): the
    online softmax's new running max and sum, P [GP, BL] and the accumulator's rescale alpha [GP]."""
    offs_l = j0 + tl.arange(0, BL)
    mask_l = (offs_l >= lo) & (offs_l < hi)
    if DOT_F32:  # the interpreter multiplies bf16 as raw bits in tl.dot
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    else:
        s = tl.dot(q, tl.trans(k))                                           # [GP, BL] fp32
    s = tl.where(mask_l[None, :], s * qk_scale, _NEG)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.where(mask_l[None, :], tl.exp(s - m_new[:, None]), 0.0)
    return m_new, l_i * alpha + tl.sum(p, axis=1), p, alpha


@triton.jit
def _pv(acc, alpha, p, v, DOT_F32: tl.constexpr):
    """The P.V accumulator rescaled by alpha plus P [GP, BL] times the block's values v [BL, D] (q's dtype)."""
    if DOT_F32:
        return acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
    return acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _step(q, k_ptr, v_ptr, ksc_ptr, vsc_ptr, slot_ptr, b, kvh, stride_sb, qk_scale, j0, lo, hi, m_i, l_i, acc,
          HKV: tl.constexpr, D: tl.constexpr, BL: tl.constexpr, FMT: tl.constexpr, DOT_F32: tl.constexpr):
    """One block of BL keys: online-softmax update of (running max, running sum, P.V accumulator); the values
    are read after the scores."""
    offs_l = j0 + tl.arange(0, BL)
    mask_l = (offs_l >= lo) & (offs_l < hi)
    slots = tl.load(slot_ptr + b * stride_sb + offs_l, mask=mask_l, other=0)
    k = _load_kv(k_ptr, ksc_ptr, slots, mask_l, kvh, HKV, D, BL, FMT).to(q.dtype)   # [BL, D]
    m_i, l_i, p, alpha = _scores(q, k, j0, lo, hi, qk_scale, m_i, l_i, BL, DOT_F32)
    v = _load_kv(v_ptr, vsc_ptr, slots, mask_l, kvh, HKV, D, BL, FMT).to(q.dtype)
    return m_i, l_i, _pv(acc, alpha, p, v, DOT_F32)


@triton.jit
def _load_block(k_ptr, v_ptr, ksc_ptr, vsc_ptr, slot_ptr, b, kvh, stride_sb, j0, lo, hi, HKV: tl.constexpr,
                D: tl.constexpr, BL: tl.constexpr, FMT: tl.constexpr):
    """The keys and values [BL, D] fp32 of slot-table columns j0.. (rows outside [lo, hi) are not read: 0)."""
    offs_l = j0 + tl.arange(0, BL)
    mask_l = (offs_l >= lo) & (offs_l < hi)
    slots = tl.load(slot_ptr + b * stride_sb + offs_l, mask=mask_l, other=0)
    k = _load_kv(k_ptr, ksc_ptr, slots, mask_l, kvh, HKV, D, BL, FMT)
    v = _load_kv(v_ptr, vsc_ptr, slots, mask_l, kvh, HKV, D, BL, FMT)
    return k, v


@triton.jit
def _update(q, k, v, j0, lo, hi, qk_scale, m_i, l_i, acc, new_j, k_new, v_new, BL: tl.constexpr,
            DOT_F32: tl.constexpr):
    """`_step` on a block already read (k, v [BL, D] fp32, `_load_block`), whose column new_j (this step's token)
    is taken from k_new / v_new [D], the rows the kernel writes (its pages may have been read before the write)."""
    is_new = ((j0 + tl.arange(0, BL)) == new_j)[:, None]
    k = tl.where(is_new, k_new[None, :], k).to(q.dtype)
    v = tl.where(is_new, v_new[None, :], v).to(q.dtype)
    m_i, l_i, p, alpha = _scores(q, k, j0, lo, hi, qk_scale, m_i, l_i, BL, DOT_F32)
    return m_i, l_i, _pv(acc, alpha, p, v, DOT_F32)


@triton.jit
def _span(sp, CHUNK, length, WINDOW, BL: tl.constexpr, NBLK_C: tl.constexpr):
    """(lo, hi, j_first): the keys [lo, hi) chunk sp attends to, and the slot-table column its first key block
    starts at (the interpreter walks every block of the chunk, a constant count)."""
    lo = sp * CHUNK
    hi = tl.minimum(lo + CHUNK, length)
    if WINDOW > 0:
        lo = tl.maximum(lo, length - WINDOW)
    if NBLK_C > 0:
        return lo, hi, sp * CHUNK
    return lo, hi, lo // BL * BL


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, ksc_ptr, vsc_ptr, slot_ptr, len_ptr, m_ptr, l_ptr, o_ptr, out_ptr,
                   stride_sb, qk_scale, v_factor, CHUNK, WINDOW, kn_ptr, vn_ptr, cos_ptr, sin_ptr, pos_ptr,
                   oslot_ptr, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, s_cs, k_wscale, v_wscale, NBLK_C: tl.constexpr,
                   HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BL: tl.constexpr,
                   FMT: tl.constexpr, DOT_F32: tl.constexpr, FINAL: tl.constexpr, PDL: tl.constexpr = False,
                   ROPE: tl.constexpr = False, NEOX: tl.constexpr = True, FMT_W: tl.constexpr = 0, tr_ptr=None,
                   tr_id=0, TRACE: tl.constexpr = False, EARLY: tl.constexpr = False, bq_ptr=None, bk_ptr=None,
                   bv_ptr=None, nq_ptr=None, nk_ptr=None, n_eps=0.0, BIAS: tl.constexpr = False,
                   QKN: tl.constexpr = 0):
    tr_rec = t_rec(tr_ptr, (tl.program_id(0) * HKV + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2),
                   TRACE)                                 # `trace`: QUANTRT_CUDA_TRACE=1 timelines
    t_stamp(tr_rec, 0, TRACE)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    S = tl.num_programs(2)
    H: tl.constexpr = HKV * G
    offs_g = tl.arange(0, GP)
    mask_g = offs_g < G
    offs_d = tl.arange(0, D)
    heads = kvh * G + offs_g                                                   # [GP] query heads
    if EARLY:   # (ROPE; plain or fp8 pages) what no kernel of this step writes is requested before the grid
        # dependency wait: the length, position and out slot, the rope row and the first key block's slots, keys
        # and values (their round trips overlap the kernel before)
        length = tl.load(len_ptr + b).to(tl.int32)
        pos = tl.load(pos_ptr + b).to(tl.int64)
        slot_new = tl.load(oslot_ptr + b).to(tl.int64)
        lo, hi, j_first = _span(sp, CHUNK, length, WINDOW, BL, NBLK_C)
        k0, v0 = _load_block(k_ptr, v_ptr, ksc_ptr, vsc_ptr, slot_ptr, b, kvh, stride_sb, j_first, lo, hi, HKV, D,
                             BL, FMT)
        cos_row, sin_row = cos_ptr + pos * s_cs, sin_ptr + pos * s_cs
        partner, c, sn = rope_cols(cos_row, sin_row, D, NEOX)
    pdl_wait(PDL)
    pdl_release(PDL)    # after the wait, not at the start: the q/k/v kernel may have released this one at its start
    if not EARLY:       # (`_common.pdl_release_at`), and the o projection must not stream beside it
        length = tl.load(len_ptr + b).to(tl.int32)
        lo, hi, j_first = _span(sp, CHUNK, length, WINDOW, BL, NBLK_C)
    t_stamp(tr_rec, 1, TRACE)
    new_j = length - 1                                                         # this step's token
    holds_new = (new_j >= sp * CHUNK) & (new_j < sp * CHUNK + CHUNK)           # ... is in this chunk
    k_new = tl.zeros([D], dtype=tl.float32)
    v_new = k_new
    if ROPE:  # q, k, v: this token's unrotated rows (strided views of the qkv output)
        if not EARLY:
            pos = tl.load(pos_ptr + b).to(tl.int64)
            cos_row, sin_row = cos_ptr + pos * s_cs, sin_ptr + pos * s_cs
            partner, c, sn = rope_cols(cos_row, sin_row, D, NEOX)
        q_rows = q_ptr + b * sq_b + heads[:, None] * sq_h                     # [GP, 1]
        x = tl.load(q_rows + offs_d[None, :], mask=mask_g[:, None], other=0.0)
        xp = tl.load(q_rows + partner[None, :], mask=mask_g[:, None], other=0.0)
        if BIAS:    # the q/k/v projection's bias (`NewToken.bias`), then q's per-head norm (QKN): the layers' ops
            qb_rows = bq_ptr + heads[:, None] * D                              # before the rotary, done here
            x = add_bias(x, tl.load(qb_rows + offs_d[None, :], mask=mask_g[:, None], other=0.0))
            xp = add_bias(xp, tl.load(qb_rows + partner[None, :], mask=mask_g[:, None], other=0.0))
        if QKN != 0:
            x, xp = qk_norm(x, xp, tl.load(nq_ptr + offs_d)[None, :], tl.load(nq_ptr + partner)[None, :], n_eps, D,
                            QKN, 1)
        q = rne(rope_apply(x, xp, c[None, :], sn[None, :]), x.dtype)           # as rotary_kv_store rounds it
        kn_row, vn_row = kn_ptr + b * sk_b + kvh * sk_h, vn_ptr + b * sv_b + kvh * sv_h
        kb_row, vb_row = kn_row, vn_row                                        # unread without BIAS
        if BIAS:
            kb_row, vb_row = bk_ptr + kvh * D, bv_ptr + kvh * D
        if EARLY:   # k, v kept in registers: every block takes the new token's row from them (`_update`)
            k_new, v_new = rope_kv_rows(kn_row, vn_row, partner, c, sn, D, kb_row, vb_row, nk_ptr, n_eps, BIAS, QKN)
            if holds_new:
                store_kv(k_ptr, ksc_ptr, slot_new, kvh, k_new, k_wscale, HKV, D, FMT_W)
                store_kv(v_ptr, vsc_ptr, slot_new, kvh, v_new, v_wscale, HKV, D, FMT_W)
            if FMT_W != 0:  # fp8 pages: the rows as `_load_kv` reads their codes back
                k_new = _fp8_bits(fp8_encode(k_new / k_wscale, FMT_W).to(tl.int32), FMT_W).to(tl.float32)
                v_new = _fp8_bits(fp8_encode(v_new / v_wscale, FMT_W).to(tl.int32), FMT_W).to(tl.float32)
        else:
            if holds_new:
                rope_store_kv(kn_row, vn_row, k_ptr, v_ptr, ksc_ptr, vsc_ptr, cos_row, sin_row,
                              tl.load(oslot_ptr + b).to(tl.int64), kvh, k_wscale, v_wscale, HKV, D, NEOX, FMT_W,
                              kb_row, vb_row, nk_ptr, n_eps, BIAS, QKN)
            tl.debug_barrier()                            # the CTA reads the row it wrote below
    else:
        q = tl.load(q_ptr + (b * H + heads)[:, None] * D + offs_d[None, :], mask=mask_g[:, None], other=0.0)
    t_stamp(tr_rec, 2, TRACE)                             # q rotated, this token's k, v written
    m_i = tl.full([GP], _NEG, tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    if EARLY:   # every block takes the new token's row from registers (`_update`)
        m_i, l_i, acc = _update(q, k0, v0, j_first, lo, hi, qk_scale, m_i, l_i, acc, new_j, k_new, v_new, BL,
                                DOT_F32)
        if NBLK_C > 0:  # the interpreter cannot loop to a run-time bound: the block count as a constant there
            for it in range(1, NBLK_C):
                k, v = _load_block(k_ptr, v_ptr, ksc_ptr, vsc_ptr, slot_ptr, b, kvh, stride_sb, j_first + it * BL, lo,
                                   hi, HKV, D, BL, FMT)
                m_i, l_i, acc = _update(q, k, v, j_first + it * BL, lo, hi, qk_scale, m_i, l_i, acc, new_j, k_new,
                                        v_new, BL, DOT_F32)
        else:
            for j0 in range(j_first + BL, hi, BL):
                k, v = _load_block(k_ptr, v_ptr, ksc_ptr, vsc_ptr, slot_ptr, b, kvh, stride_sb, j0, lo, hi, HKV, D,
                                   BL, FMT)
                m_i, l_i, acc = _update(q, k, v, j0, lo, hi, qk_scale, m_i, l_i, acc, new_j, k_new, v_new, BL,
                                        DOT_F32)
    elif NBLK_C > 0:
        for it in range(0, NBLK_C):
            m_i, l_i, acc = _step(q, k_ptr, v_ptr, ksc_ptr, vsc_ptr, slot_ptr, b, kvh, stride_sb, qk_scale,
                                  j_first + it * BL, lo, hi, m_i, l_i, acc, HKV, D, BL, FMT, DOT_F32)
    else:  # only the key blocks this sequence (and window) reaches within the chunk
        for j0 in range(j_first, hi, BL):
            m_i, l_i, acc = _step(q, k_ptr, v_ptr, ksc_ptr, vsc_ptr, slot_ptr, b, kvh, stride_sb, qk_scale,
                                  j0, lo, hi, m_i, l_i, acc, HKV, D, BL, FMT, DOT_F32)
    if FINAL:  # one split, no sinks: the combine's result directly (its weight exp(m - m) is 1)
        out = acc / tl.maximum(l_i, 1e-30)[:, None] * v_factor
        tl.store(out_ptr + (b * H + heads)[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask_g[:, None])
    else:
        row = (b * H + heads) * S + sp                                         # [GP]
        tl.store(m_ptr + row, m_i, mask=mask_g)
        tl.store(l_ptr + row, l_i, mask=mask_g)
        tl.store(o_ptr + row[:, None] * D + offs_d[None, :], acc, mask=mask_g[:, None])
    t_done(tr_rec, tr_id, TRACE)


@triton.jit
def _combine_kernel(m_ptr, l_ptr, o_ptr, sink_ptr, out_ptr, v_factor, H, S: tl.constexpr, SP: tl.constexpr,
                    D: tl.constexpr, HAS_SINK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    bh = tl.program_id(0)                                                      # b * H + h
    offs_s = tl.arange(0, SP)
    mask_s = offs_s < S
    m = tl.load(m_ptr + bh * S + offs_s, mask=mask_s, other=_NEG)
    lsum = tl.load(l_ptr + bh * S + offs_s, mask=mask_s, other=0.0)
    offs_d = tl.arange(0, D)
    o = tl.load(o_ptr + (bh * S + offs_s)[:, None] * D + offs_d[None, :], mask=mask_s[:, None], other=0.0)
    mx = tl.max(m, axis=0)
    if HAS_SINK:
        sink = tl.load(sink_ptr + bh % H).to(tl.float32)
        mx = tl.maximum(mx, sink)
    w = tl.exp(m - mx)                                                         # [SP]
    den = tl.sum(lsum * w, axis=0)
    if HAS_SINK:
        den += tl.exp(sink - mx)
    out = tl.sum(o * w[:, None], axis=0) / tl.maximum(den, 1e-30) * v_factor   # kv_len 0 (graph padding): 0
    tl.store(out_ptr + bh * D + offs_d, out.to(out_ptr.dtype.element_ty))


def kv_format(pool) -> tuple[int, str]:
    """(KV_FMT, '') for a pool this kernel reads, else (-1, why not)."""
    kind = pool.spec.kind
    if kind is KVKind.PLAIN:
        return 0, ""
    if kind is KVKind.FP4:
        return 4, ""
    fmt = _FP8_FMT.get(pool.spec.dtype)
    return (fmt, "") if fmt else (-1, f"fp8 KV dtype {pool.spec.dtype} is not e4m3fn/e5m2/e4m3fnuz")


ONE_CHUNK_BLOCKS = 4   # a slot table of up to this many key blocks is not split (one launch, the early path)
CHUNK_BLOCKS = 2       # past that, the fewest key blocks a split takes (QUANTRT_CUDA_ATTN_CHUNK_BLOCKS: A/B runs).
# H100 int4 at a 2000-token context, batch 1 (8 KV heads): chunks of 2 blocks (16 splits) 2.29 ms a step, 1 block
# 2.32, 4 blocks 2.34, 8 blocks 2.58; batch 2 (capped at 17 splits by the two programs an SM) 2.71-2.73 for 1-4


def default_splits(batch: int, hkv: int, max_len: int, block_l: int) -> int:
    """Split the KV so that about two programs per SM run: none for a table of up to ONE_CHUNK_BLOCKS key blocks,
    else chunks of at least CHUNK_BLOCKS blocks."""
    want = cdiv(2 * num_sms(), batch * hkv)
    if want <= 1 or max_len <= ONE_CHUNK_BLOCKS * block_l:
        return 1
    blocks = int(os.environ.get("QUANTRT_CUDA_ATTN_CHUNK_BLOCKS", CHUNK_BLOCKS))
    return max(1, min(want, cdiv(max_len, blocks * block_l), 64))


def key_chunks(batch: int, hkv: int, max_len: int, block_l: int, splits: int = 0) -> tuple[int, int]:
    """(splits, keys per split) of a launch over a max_len-wide slot table: `splits` or `default_splits`, with
    whole key blocks per chunk (fewer splits where the rounding leaves one empty)."""
    s = splits or default_splits(batch, hkv, max_len, block_l)
    chunk = cdiv(cdiv(max_len, s), block_l) * block_l
    return max(1, cdiv(max_len, chunk)), chunk


@dataclass(frozen=True)
class NewToken:
    """This step's unrotated k, v [B, Hkv, D] and what `paged_decode_attention` needs to rotate q and k and to
    write k, v into the pages itself (`rope_kv_triton.rotary_kv_store`'s work, in the attention launch)."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor        # [P, D/2] tables (unit stride along D/2)
    sin: torch.Tensor
    positions: torch.Tensor  # [B]
    slots: torch.Tensor      # [B] out slots
    fmt: int                 # rope_kv_triton.pool_format
    neox: bool = True
    # the layers' ops between the q/k/v projection and the rotary, done in the attention's load of q, k, v:
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # (q [H*D], k, v [Hkv*D]) to add
    norm: tuple[torch.Tensor, torch.Tensor, float, int] | None = None     # (q weight [D], k weight, eps, QKN kind)


def paged_decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, kv_slots: torch.Tensor,
                           kv_lens: torch.Tensor, scale: float, kv_fmt: int, window: int | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0, k_sc: torch.Tensor | None = None,
                           v_sc: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                           splits: int = 0, block_l: int = BLOCK_L, num_warps: int = 0,
                           new: NewToken | None = None) -> torch.Tensor:
    """q [B, H, D] fp16/bf16; k_buf/v_buf [slots, Hkv, D] (or [slots, Hkv, D/2] fp4 with k_sc/v_sc
    [slots, Hkv*D/16]); kv_slots [B, L] slot table (padded); kv_lens [B] on the device -> [B, H, D].
    With `new`: q is unrotated (rows may be strided) and this step's k, v are not in the pages yet: the program
    whose chunk holds position kv_len - 1 rotates k and writes k, v there before reading (each sequence's
    k_scale / v_scale as the pool write uses them). num_warps 0: 8 when the grid leaves SMs idle, else 4."""
    b, h, d = q.shape
    hkv = k_buf.shape[1]
    g = h // hkv
    assert h % hkv == 0 and d >= 16 and d & (d - 1) == 0, "head_dim must be a power of two >= 16"
    if new is None or q.stride(2) != 1:
        q = q.contiguous()
    max_len = kv_slots.shape[1]
    if kv_slots.stride(1) != 1:
        kv_slots = kv_slots.contiguous()
    s, chunk = key_chunks(b, hkv, max_len, block_l, splits)
    final = s == 1 and sinks is None                    # one launch: the decode kernel normalises itself
    m = torch.empty((0 if final else b * h * s,), device=q.device, dtype=torch.float32)
    l_ = torch.empty_like(m)
    o = torch.empty((0 if final else b * h * s, d), device=q.device, dtype=torch.float32)
    factor = _FMT_FACTOR[kv_fmt]
    k_sc = k_sc if k_sc is not None else k_buf
    v_sc = v_sc if v_sc is not None else v_buf
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    # a grid that leaves SMs idle (small batches): 8 warps shorten each program's chain of loads (H100 decode
    # step, batch 1 / 2: int4 2.16 -> 2.13 / 2.41 -> 2.38 ms, fp8 3.25 -> 3.22 / 3.46 -> 3.43; batch 64 equal)
    num_warps = num_warps or (8 if b * hkv * s <= num_sms() else 4)
    nw = new or NewToken(q, q, m, m, kv_lens, kv_lens, 0)                 # stand-ins: ROPE off reads none
    # rotary over plain or fp8 pages, a small grid (EARLY_MAX_PROGRAMS): the reads that no op of this step writes go
    # out before the PDL wait (on fp4 pages, re-encoding the new rows after the wait made it slower: 2.26 vs 2.15)
    early = (new is not None and kv_fmt in (0, 1, 2) and nw.fmt == kv_fmt and b * hkv * s <= EARLY_MAX_PROGRAMS
             and os.environ.get("QUANTRT_CUDA_ATTN_EARLY", "1") != "0")
    tr, tr_id = trace_slot(q, "attn", b * hkv * s, b=b, hkv=hkv, s=s)
    bq, bk, bv = nw.bias or (q, q, q)
    nq, nk, eps, qkn = nw.norm or (q, q, 0.0, 0)
    _decode_kernel[(b, hkv, s)](q, k_buf, v_buf, k_sc, v_sc, kv_slots, kv_lens, m, l_, o, out, kv_slots.stride(0),
                                float(scale * k_scale * factor), float(v_scale * factor), chunk, int(window or 0),
                                nw.k, nw.v, nw.cos, nw.sin, nw.positions, nw.slots, q.stride(0), q.stride(1),
                                nw.k.stride(0), nw.k.stride(1), nw.v.stride(0), nw.v.stride(1),
                                nw.cos.stride(0) if new else 0, float(k_scale), float(v_scale),
                                NBLK_C=chunk // block_l if interpret_mode() else 0, HKV=hkv, G=g,
                                GP=max(16, triton.next_power_of_2(g)), D=d, BL=block_l, FMT=kv_fmt,
                                DOT_F32=interpret_mode(), FINAL=final, ROPE=new is not None, NEOX=nw.neox,
                                FMT_W=nw.fmt, tr_ptr=tr, tr_id=tr_id, TRACE=tr is not None, EARLY=early,
                                bq_ptr=bq, bk_ptr=bk, bv_ptr=bv, nq_ptr=nq, nk_ptr=nk, n_eps=float(eps),
                                BIAS=nw.bias is not None, QKN=qkn, num_warps=num_warps, num_stages=2,
                                **pdl_row_opts(q, b))
    if final:
        return out
    _combine_kernel[(b * h,)](m, l_, o, sinks if sinks is not None else m, out, float(v_scale * factor), h,
                              S=s, SP=triton.next_power_of_2(s), D=d, HAS_SINK=sinks is not None, num_warps=4,
                              **pdl_row_opts(q, b))
    return out


__all__ = ["BLOCK_L", "EARLY_MAX_PROGRAMS", "NewToken", "default_splits", "key_chunks", "kv_format",
           "paged_decode_attention"]
