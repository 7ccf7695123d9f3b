"""Rotary embedding and the KV-pool write in one Triton kernel (`Platform.rotary_kv_store_op` on CUDA).

One launch per attention layer replaces the rotary's torch kernels (halves swap, x * cos, addcmul) and the
pool writes (an index_copy per side; fp8 adds a cast, a division and a conversion per side, fp4 about fifteen).
Grid (T, H + Hkv); program (t, j) takes token t:
- j < H: rotates q head j at positions[t] into q_out[t, j] (x.dtype, contiguous: the attention's input);
- j >= H: rotates k head j - H, writes it and v head j - H into the pool at slots[t], stored as the pool
  stores them (engine/kv_pool.py, kv_quant.py): plain (cast to the pool dtype); fp8 e4m3fn / e5m2 uint8 bits
  of x / scale, rounded to nearest even and saturated like torch's conversion (integer ops: the Triton
  interpreter converts fp8 differently, and truncates bf16: `rne` rounds explicitly); fp4 e2m1 codes (even element in the low nibble) plus one power-of-two scale byte per 16
  elements, exactly `fp4_quantize(x / scale)`'s rule.
Rotation, neox (rotate halves) or gptj (adjacent pairs), rounded as quantrt.layers.rotary rounds it:
y = round(round(x * cos) + x_partner * (-+sin)) in x.dtype (torch's x * cos, then addcmul). cos/sin are the
[P, D/2] tables of RotaryEmbedding (llama3 / yarn scaling already applied), read at positions[t].
No inline PTX: the same kernel compiles for ROCm. Launched like the other per-layer ops (`pdl_triton.pdl_row_opts`:
PDL on sm_90+), so the qkv GEMV -> this -> attention chain keeps its launches overlapped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantrt.engine.kv_quant import FP4_BLOCK, KVKind
from quantrt.platforms.cuda.kernels.pdl_triton import pdl_enter, pdl_row_opts
from quantrt.platforms.cuda.layer_ops import rne, scaled

_FP8 = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def rope_cols(cos_ptr, sin_ptr, D: tl.constexpr, NEOX: tl.constexpr):
    """For the D columns of a head row: the partner column each is rotated with, and the fp32 cos and signed sin
    it is multiplied by (cos_ptr/sin_ptr: the [D/2] table row of the position) -> (partner, c, s), each [D]."""
    e = tl.arange(0, D)
    half: tl.constexpr = D // 2
    if NEOX:
        first = e < half
        partner = tl.where(first, e + half, e - half)
        f = tl.where(first, e, e - half)
    else:
        first = (e % 2) == 0
        partner = e ^ 1
        f = e // 2
    c = tl.load(cos_ptr + f).to(tl.float32)
    s = tl.load(sin_ptr + f).to(tl.float32)
    return partner, c, tl.where(first, -s, s)


@triton.jit
def rope_apply(x, xp, c, s):
    """x rotated (x, its partner columns xp: the model dtype; c, s from `rope_cols`) -> fp32, not yet rounded to
    x's dtype: round(x * cos) + x_partner * (-+sin), torch's x * cos then addcmul."""
    return rne(x.to(tl.float32) * c, x.dtype).to(tl.float32) + xp.to(tl.float32) * s


@triton.jit
def _rope(x_ptr, cos_ptr, sin_ptr, D: tl.constexpr, NEOX: tl.constexpr):
    """One head row x [D] rotated -> fp32 [D] (not yet rounded to x's dtype). cos_ptr/sin_ptr: the table row."""
    partner, c, s = rope_cols(cos_ptr, sin_ptr, D, NEOX)
    return rope_apply(tl.load(x_ptr + tl.arange(0, D)), tl.load(x_ptr + partner), c, s)


@triton.jit
def add_bias(x, b):
    """x + the projection's bias b, rounded to x's dtype as torch's y + bias rounds it."""
    return rne(x.to(tl.float32) + b.to(tl.float32), x.dtype)


@triton.jit
def qk_norm(x, xp, w, wp, eps, D: tl.constexpr, QKN: tl.constexpr, AXIS: tl.constexpr):
    """Per-head RMSNorm of q or k rows (Qwen3, Gemma 3) before the rotary: x [.., D] (AXIS: the D axis), its partner
    columns xp (the same rows, permuted), weights w / wp -> (y, yp) in x's dtype. QKN 1: the norm rounded, times w,
    rounded (`triton_rms_norm`); QKN 2: w is Gemma's fp32 (1 + w), one rounding (`RMSNorm(offset=True)`)."""
    dt: tl.constexpr = x.dtype
    xf = x.to(tl.float32)
    if AXIS == 1:
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)[:, None]
    else:
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    return scaled(xf, rstd, w, dt, QKN == 2), scaled(xp.to(tl.float32), rstd, wp, dt, QKN == 2)


@triton.jit
def rope_kv_rows(k_ptr, v_ptr, partner, c, s, D: tl.constexpr, kb_ptr, vb_ptr, kw_ptr, eps, BIAS: tl.constexpr,
                 QKN: tl.constexpr):
    """One token's KV head (k_ptr / v_ptr: its rows; partner, c, s from `rope_cols`) -> (k rotated and rounded to
    the model dtype, v), both fp32 [D]: the rows `store_kv` writes, and what plain pages read back. BIAS: the
    projection's bias rows kb_ptr / vb_ptr are added first; QKN: then k's per-head RMSNorm with weight kw_ptr
    (`qk_norm`): the layers' ops before the rotary, in this load."""
    e = tl.arange(0, D)
    k = tl.load(k_ptr + e)
    kp = tl.load(k_ptr + partner)
    v = tl.load(v_ptr + e)
    if BIAS:
        k = add_bias(k, tl.load(kb_ptr + e))
        kp = add_bias(kp, tl.load(kb_ptr + partner))
        v = add_bias(v, tl.load(vb_ptr + e))
    if QKN != 0:
        k, kp = qk_norm(k, kp, tl.load(kw_ptr + e), tl.load(kw_ptr + partner), eps, D, QKN, 0)
    k = rne(rope_apply(k, kp, c, s), k_ptr.dtype.element_ty)
    return k.to(tl.float32), v.to(tl.float32)


@triton.jit
def rope_store_kv(k_ptr, v_ptr, kb_ptr, vb_ptr, ksc_ptr, vsc_ptr, cos_row, sin_row, slot, kvh, k_scale, v_scale,
                  HKV: tl.constexpr, D: tl.constexpr, NEOX: tl.constexpr, FMT: tl.constexpr, bk_ptr, bv_ptr, nk_ptr,
                  eps, BIAS: tl.constexpr, QKN: tl.constexpr):
    """KV head kvh of one token (k_ptr / v_ptr: its rows): k rotated and rounded to the model dtype, written with v
    into the pool at `slot` as the pool stores them (BIAS / QKN: `rope_kv_rows`)."""
    partner, c, s = rope_cols(cos_row, sin_row, D, NEOX)
    k, v = rope_kv_rows(k_ptr, v_ptr, partner, c, s, D, bk_ptr, bv_ptr, nk_ptr, eps, BIAS, QKN)
    store_kv(kb_ptr, ksc_ptr, slot, kvh, k, k_scale, HKV, D, FMT)
    store_kv(vb_ptr, vsc_ptr, slot, kvh, v, v_scale, HKV, D, FMT)


@triton.jit
def fp8_encode(x, FMT: tl.constexpr):
    """fp32 [N] -> uint8 bits of e4m3fn (FMT 1) / e5m2 (FMT 2), round to nearest even, as torch converts:
    e4m3fn saturates at 448 (inf too), e5m2 overflows to inf, NaN -> 0x7F; subnormals through one fp32 add."""
    if FMT == 1:
        M: tl.constexpr = 3
        BIAS: tl.constexpr = 7
        CAP: tl.constexpr = 0x7E                     # 448
    else:
        M: tl.constexpr = 2
        BIAS: tl.constexpr = 15
        CAP: tl.constexpr = 0x7C                     # inf
    MIN_NORMAL: tl.constexpr = (127 + 1 - BIAS) << 23
    DENORM: tl.constexpr = (127 + 23 - M - (BIAS - 1)) << 23
    u = x.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    odd = (a >> (23 - M)) & 1
    normal = (a + (((BIAS - 127) << 23) + (1 << (22 - M)) - 1) + odd) >> (23 - M)
    denorm_f = a.to(tl.float32, bitcast=True) + tl.full(a.shape, DENORM, tl.int32).to(tl.float32, bitcast=True)
    sub = denorm_f.to(tl.int32, bitcast=True) - DENORM
    r = tl.where(a > 0x7F800000, 0x7F, tl.where(a < MIN_NORMAL, sub, tl.minimum(normal, CAP)))
    return (r | sign).to(tl.uint8)


@triton.jit
def store_kv(buf_ptr, sc_ptr, slot, kvh, x, scale, HKV: tl.constexpr, D: tl.constexpr, FMT: tl.constexpr):
    """x: one head row [D] fp32 (already rounded to the model dtype) -> the pool row (slot, kvh)."""
    e = tl.arange(0, D)
    if FMT == 0:
        tl.store(buf_ptr + slot * (HKV * D) + kvh * D + e, rne(x, buf_ptr.dtype.element_ty))
    elif FMT == 4:
        NB: tl.constexpr = D // 16
        blk = tl.reshape(x / scale, [NB, 16])
        amax = tl.max(tl.abs(blk), axis=1)                                       # [NB]
        y = tl.maximum(amax, 1.1754943508222875e-38) / 6.0
        bits = y.to(tl.int32, bitcast=True)
        ex = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)  # ceil(log2 y), exact
        ex = tl.minimum(tl.where(y < 1.1754943508222875e-38, -127, ex), 127)
        inv = (tl.maximum(127 - ex, 1) << 23).to(tl.float32, bitcast=True)      # 2 ** -ex
        v = blk * inv[:, None]                                                   # |v| <= 6
        av = tl.abs(v)
        mag = ((av > 0.25).to(tl.int32) + (av > 0.75).to(tl.int32) + (av > 1.25).to(tl.int32)
               + (av > 1.75).to(tl.int32) + (av > 2.5).to(tl.int32) + (av > 3.5).to(tl.int32)
               + (av > 5.0).to(tl.int32))                                        # ties round down
        codes = tl.reshape(mag | ((v < 0).to(tl.int32) << 3), [D // 2, 2])
        packed = tl.sum(codes * (1 + 15 * tl.arange(0, 2))[None, :], axis=1)  # even element in the low nibble
        tl.store(buf_ptr + slot * (HKV * D // 2) + kvh * (D // 2) + tl.arange(0, D // 2), packed.to(tl.uint8))
        tl.store(sc_ptr + slot * (HKV * NB) + kvh * NB + tl.arange(0, NB), (ex + 127).to(tl.uint8))
    else:
        tl.store(buf_ptr + slot * (HKV * D) + kvh * D + e, fp8_encode(x / scale, FMT))


@triton.jit
def _rope_kv_store_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, kb_ptr, vb_ptr,
                          ksc_ptr, vsc_ptr, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, s_cs, k_scale, v_scale,
                          H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, NEOX: tl.constexpr,
                          FMT: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c_row, s_row = cos_ptr + pos * s_cs, sin_ptr + pos * s_cs
    e = tl.arange(0, D)
    if j < H:
        y = _rope(q_ptr + t * sq_t + j * sq_h, c_row, s_row, D, NEOX)
        tl.store(qo_ptr + (t * H + j) * D + e, rne(y, qo_ptr.dtype.element_ty))
    else:
        kvh = j - H
        slot = tl.load(slot_ptr + t).to(tl.int64)
        rope_store_kv(k_ptr + t * sk_t + kvh * sk_h, v_ptr + t * sv_t + kvh * sv_h, kb_ptr, vb_ptr, ksc_ptr, vsc_ptr,
                      c_row, s_row, slot, kvh, k_scale, v_scale, HKV, D, NEOX, FMT, k_ptr, k_ptr, k_ptr, 0.0, False, 0)


def pool_format(pool) -> tuple[int, str]:
    """(FMT, '') for a KV pool this kernel writes: 0 plain, 1 e4m3fn, 2 e5m2, 4 fp4; else (-1, why not)."""
    kind = pool.spec.kind
    if not getattr(pool, "has_v", True):
        return -1, "the pool has no V rows (MLA latent cache)"
    if kind is KVKind.PLAIN:
        return (0, "") if pool.dtype in _FLOATS else (-1, f"plain KV dtype {pool.dtype} is not fp16/bf16/fp32")
    if kind is KVKind.FP4:
        return 4, ""
    fmt = _FP8.get(pool.spec.dtype)
    return (fmt, "") if fmt else (-1, f"fp8 KV dtype {pool.spec.dtype} is not e4m3fn/e5m2")


def can_fuse_rotary_kv_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, pool, layer: int) -> tuple[bool, str]:
    """Whether `rotary_kv_store` serves these tensors and this pool, with the reason when it does not."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        return False, f"q {tuple(q.shape)} / k {tuple(k.shape)} / v {tuple(v.shape)} are not [T, H, D] / [T, Hkv, D]"
    d = q.shape[2]
    if d < 16 or d & (d - 1):
        return False, f"head_dim {d} is not a power of two >= 16"
    if cos.dim() != 2 or cos.shape[1] * 2 != d or cos.stride(1) != 1:
        return False, f"cos table {tuple(cos.shape)} is not [positions, head_dim / 2 = {d // 2}] with unit stride"
    if sin.shape != cos.shape or sin.stride() != cos.stride() or sin.dtype != cos.dtype:
        return False, f"sin table {tuple(sin.shape)} does not match the cos table {tuple(cos.shape)}"
    if q.dtype not in _FLOATS or k.dtype != q.dtype or v.dtype != q.dtype or cos.dtype not in _FLOATS:
        return False, f"dtypes q {q.dtype} / k {k.dtype} / v {v.dtype} / cos {cos.dtype} are not one float dtype"
    if any(t.stride(2) != 1 for t in (q, k, v)):
        return False, "q, k and v rows must be contiguous along head_dim"
    fmt, why = pool_format(pool)
    if fmt < 0:
        return False, why
    if fmt == 4 and d % FP4_BLOCK:
        return False, f"fp4 KV blocks of {FP4_BLOCK} do not tile head_dim {d}"
    buf = pool.k[layer]
    if tuple(buf.shape[1:]) != (k.shape[1], d // 2 if fmt == 4 else d) or not buf.is_contiguous():
        return False, f"pool layer {layer} rows {tuple(buf.shape[1:])} do not match k heads {tuple(k.shape[1:])}"
    if q.device != buf.device:
        return False, f"q is on {q.device}, the pool on {buf.device}"
    return True, ""


def rotary_kv_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    positions: torch.Tensor, pool, layer: int, slots: torch.Tensor, k_scale: float = 1.0,
                    v_scale: float = 1.0, neox: bool = True) -> torch.Tensor | None:
    """q [T, H, D], k/v [T, Hkv, D] (views of the qkv output are fine), cos/sin [P, D/2], positions/slots [T]
    -> rotated q [T, H, D] (contiguous), with rotated k and v written into pool layer `layer` at `slots`;
    None (nothing written) when `can_fuse_rotary_kv_store` declines."""
    ok, _ = can_fuse_rotary_kv_store(q, k, v, cos, sin, pool, layer)
    if not ok:
        return None
    t, h, d = q.shape
    hkv = k.shape[1]
    fmt, _ = pool_format(pool)
    out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    kb, vb = pool.k[layer], pool.v[layer]
    ksc, vsc = (pool.k_sc[layer], pool.v_sc[layer]) if fmt == 4 else (kb, vb)
    _rope_kv_store_kernel[(t, h + hkv)](q, k, v, out, cos, sin, positions, slots, kb, vb, ksc, vsc,
                                        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                        cos.stride(0), float(k_scale), float(v_scale), H=h, HKV=hkv, D=d,
                                        NEOX=neox, FMT=fmt, num_warps=1 if d <= 128 else 2, **pdl_row_opts(q, t))
    return out


__all__ = ["add_bias", "can_fuse_rotary_kv_store", "fp8_encode", "pool_format", "qk_norm", "rope_apply", "rope_cols",
           "rope_kv_rows", "rope_store_kv", "rotary_kv_store", "store_kv"]
