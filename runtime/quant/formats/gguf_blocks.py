"""GGUF block types -> canonical weights, exactly (FORMATS.md §2.9; block layouts of gguf 0.19).

Each decoder takes the raw bytes of one tensor, uint8 [N, K/B * type_size] (B = block elements), and
returns an IntWeight / CodebookWeight whose `dequantize()` equals `gguf.quants.dequantize` bit for bit:
the per-group products (d·sc, dmin·m) are formed in fp32 exactly as llama.cpp's reference does.

| type   | bits | group | canonical form                                  |
|--------|------|-------|-------------------------------------------------|
| Q4_0   | 4    | 32    | (q − 8)·d            zero 8                     |
| Q4_1   | 4    | 32    | q·d + m              offset m                   |
| Q5_0   | 5    | 32    | (q − 16)·d           zero 16                    |
| Q5_1   | 5    | 32    | q·d + m              offset m                   |
| Q8_0   | 8    | 32    | q·d                  signed codes               |
| Q2_K   | 2    | 16    | q·(d·sc) − dmin·m    offset                     |
| Q3_K   | 3    | 16    | q·(d·(sc − 32))      signed codes −4..3         |
| Q4_K   | 4    | 32    | q·(d·sc) − dmin·m    offset                     |
| Q5_K   | 5    | 32    | q·(d·sc) − dmin·m    offset                     |
| Q6_K   | 6    | 16    | (q − 32)·(d·sc)      zero 32                    |
| IQ4_NL | 4    | 32    | kvalues[q]·d         CodebookWeight             |
"""

from __future__ import annotations

import torch

from quantrt.errors import CheckpointError
from quantrt.quant.formats.packing import unpack_gguf_q4
from quantrt.quant.weights import CodebookWeight, IntWeight

IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# name -> (block elements, block bytes)
BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
          "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176),
          "Q6_K": (256, 210), "IQ4_NL": (32, 18)}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [...] fp32 (little-endian fp16)."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def _bits(b: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """[..., L] uint8 -> [..., len(shifts), L]: (b >> s) & mask for each shift."""
    sh = torch.tensor(shifts, dtype=torch.uint8).view(len(shifts), 1)
    return (b.unsqueeze(-2) >> sh) & mask


def _rows(codes: torch.Tensor, n: int) -> torch.Tensor:
    return codes.reshape(n, -1)


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12 bytes -> 8 six-bit scales and 8 six-bit mins ([..., 8] each)."""
    d, m, md = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]
    scales = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales.to(torch.float32), mins.to(torch.float32)


def decode_blocks(raw: torch.Tensor, type_name: str, shape: tuple[int, int]) -> IntWeight | CodebookWeight:
    """raw: uint8 [N, K/B*bytes] -> canonical weight of `shape` [N, K]."""
    if type_name not in BLOCKS:
        raise CheckpointError(f"GGUF type {type_name} has no native decoder (supported: {', '.join(BLOCKS)})")
    n, k = shape
    be, bb = BLOCKS[type_name]
    if k % be:
        raise CheckpointError(f"GGUF {type_name}: K={k} is not a multiple of the {be}-element block")
    if tuple(raw.shape) != (n, k // be * bb):
        raise CheckpointError(f"GGUF {type_name} tensor has {tuple(raw.shape)} bytes, expected {(n, k // be * bb)}")
    b = raw.reshape(n, k // be, bb)                                          # [N, nb, bytes]
    nb = k // be
    if type_name in ("Q4_0", "IQ4_NL"):
        d, q = _f16(b[..., 0:2]), _rows(unpack_gguf_q4(b[..., 2:18]), n)
        if type_name == "IQ4_NL":
            return CodebookWeight(q, torch.tensor(IQ4_NL_VALUES, dtype=torch.float32), d.reshape(-1), 32)
        return IntWeight(q, d, 4, 32, zero=torch.full_like(d, 8, dtype=torch.uint8))
    if type_name == "Q4_1":
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        return IntWeight(_rows(unpack_gguf_q4(b[..., 4:20]), n), d, 4, 32, offset=m)
    if type_name in ("Q5_0", "Q5_1"):
        o = 2 if type_name == "Q5_0" else 4
        d = _f16(b[..., 0:2])
        qh = b[..., o:o + 4].contiguous().view(torch.int32)                   # [N, nb, 1]
        hi = ((qh >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)  # [N, nb, 32]
        q = _rows(unpack_gguf_q4(b[..., o + 4:o + 20]) | (hi << 4), n)
        if type_name == "Q5_0":
            return IntWeight(q, d, 5, 32, zero=torch.full_like(d, 16, dtype=torch.uint8))
        return IntWeight(q, d, 5, 32, offset=_f16(b[..., 2:4]))
    if type_name == "Q8_0":
        return IntWeight(_rows(b[..., 2:34].contiguous().view(torch.int8), n), _f16(b[..., 0:2]), 8, 32)
    if type_name == "Q2_K":
        sc, qs = b[..., 0:16], b[..., 16:80]
        d, dmin = _f16(b[..., 80:82]), _f16(b[..., 82:84])                   # [N, nb]
        q = _bits(qs.reshape(n, nb, 2, 32), [0, 2, 4, 6], 3)                   # [N, nb, 2, 4, 32]
        scale = d[..., None] * (sc & 0xF).to(torch.float32)                    # [N, nb, 16]
        offset = -(dmin[..., None] * (sc >> 4).to(torch.float32))
        return IntWeight(_rows(q, n), scale.reshape(n, -1), 2, 16, offset=offset.reshape(n, -1))
    if type_name == "Q3_K":
        hmask, qs, sc, d = b[..., 0:32], b[..., 32:96], b[..., 96:108], _f16(b[..., 108:110])
        lo = _bits(sc[..., 0:8], [0, 4], 0xF).reshape(n, nb, 16)
        hi = _bits(sc[..., 8:12], [0, 2, 4, 6], 3).reshape(n, nb, 16)
        scale = d[..., None] * ((lo | (hi << 4)).to(torch.float32) - 32)       # [N, nb, 16]
        ql = _bits(qs.reshape(n, nb, 2, 32), [0, 2, 4, 6], 3).reshape(n, nb, 256)
        qh = _bits(hmask, list(range(8)), 1).reshape(n, nb, 256) ^ 1
        q = ql.to(torch.int8) - (qh << 2).to(torch.int8)
        return IntWeight(_rows(q, n), scale.reshape(n, -1), 3, 16)
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        s6, m6 = _scale_min_k4(b[..., 4:16])
        scale, offset = d[..., None] * s6, -(dmin[..., None] * m6)             # [N, nb, 8]
        if type_name == "Q4_K":
            q = _bits(b[..., 16:144].reshape(n, nb, 4, 32), [0, 4], 0xF)        # [N, nb, 4, 2, 32]
            return IntWeight(_rows(q, n), scale.reshape(n, -1), 4, 32, offset=offset.reshape(n, -1))
        qh = _bits(b[..., 16:48], list(range(8)), 1)                           # [N, nb, 8, 32]
        ql = _bits(b[..., 48:176].reshape(n, nb, 4, 32), [0, 4], 0xF).reshape(n, nb, 8, 32)
        return IntWeight(_rows(ql | (qh << 4), n), scale.reshape(n, -1), 5, 32, offset=offset.reshape(n, -1))
    # Q6_K
    ql, qh = b[..., 0:128], b[..., 128:192]
    sc, d = b[..., 192:208].contiguous().view(torch.int8), _f16(b[..., 208:210])
    lo = _bits(ql.reshape(n, nb, 2, 64), [0, 4], 0xF).reshape(n, nb, 8, 32)   # (half, shift, 64)
    hi = _bits(qh.reshape(n, nb, 2, 32), [0, 2, 4, 6], 3).reshape(n, nb, 8, 32)
    q = lo | (hi << 4)
    scale = (d[..., None] * sc.to(torch.float32)).reshape(n, -1)               # [N, K/16]
    return IntWeight(_rows(q, n), scale, 6, 16, zero=torch.full_like(scale, 32, dtype=torch.uint8))
