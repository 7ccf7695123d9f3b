"""Bit packing orders of the integer formats (FORMATS.md §2.2, §2.3, §2.8, §2.9, §7 fact 4).

Every unpacker returns one code per element (uint8) in the logical order; every packer is its exact
inverse and writes the on-disk layout (tests and our own checkpoint writers use them).

| format            | container        | order                                                   |
|-------------------|------------------|---------------------------------------------------------|
| AWQ               | int32 along N    | nibble slot i holds column 8c + AWQ_ORDER[i]            |
| GPTQ (2/4/8 bit)  | int32 along K/N  | LSB-first, contiguous                                   |
| GPTQ (3 bit)      | 3 int32 / 32 val | one LSB-first bit stream (values straddle words)        |
| bitsandbytes 4bit | uint8 flat       | even element in the HIGH nibble                         |
| GGUF Q4_0/Q4_1    | 16 bytes / 32    | byte j: element j low nibble, element j+16 high nibble  |
"""

from __future__ import annotations

import torch

from quantrt.errors import CheckpointError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)      # nibble slot i -> logical column offset
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)    # logical column offset j -> nibble slot
GPTQ_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in GPTQ_BITS:
        raise CheckpointError(f"bits={bits} is not supported; packed int formats use bits {GPTQ_BITS}")


def _as_i32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype not in (torch.int32, torch.uint32):
        raise CheckpointError(f"{what} has dtype {t.dtype}; expected int32 packed words")
    return t.view(torch.int32) if t.dtype == torch.uint32 else t


# ---- LSB-first bit streams (GPTQ, compressed-tensors) ----------------------------------------------
def unpack_lsb(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words packed LSB-first along `dim` -> uint8 codes with that dim grown by 32/bits.

    [R, C] with dim=0 -> [R*32/bits, C]; dim=1 -> [R, C*32/bits]. bits=3: every 3 words hold 32 values
    as one little-endian bit stream (value 10 takes bits 30-31 of word 0 and bit 0 of word 1).
    """
    _check_bits(bits)
    w = _as_i32(words, "packed tensor")
    if dim == 1:
        return unpack_lsb(w.t(), bits, 0).t().contiguous()
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=w.device).view(1, per, 1)
        vals = (w.unsqueeze(1) >> shifts) & mask                               # [R, per, C]
        return vals.reshape(-1, w.shape[-1]).to(torch.uint8)
    if w.shape[0] % bits:
        raise CheckpointError(f"{bits}-bit packed tensor has {w.shape[0]} words along the packed dim; "
                              f"expected a multiple of {bits}")
    shifts = torch.arange(32, dtype=torch.int32, device=w.device).view(1, 32, 1)
    bitv = ((w.unsqueeze(1) >> shifts) & 1).reshape(-1, bits, w.shape[-1])    # [R*32/b, b, C]
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=w.device)).view(1, bits, 1)
    return (bitv * weights).sum(dim=1).to(torch.uint8)


def pack_lsb(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `unpack_lsb`: uint8 codes [L, C] (dim=0) -> int32 [L*bits/32, C]."""
    _check_bits(bits)
    if dim == 1:
        return pack_lsb(codes.t(), bits, 0).t().contiguous()
    c = codes.to(torch.int64)
    if c.shape[0] * bits % 32:
        raise CheckpointError(f"{c.shape[0]} values of {bits} bits do not fill whole int32 words")
    shifts = torch.arange(bits, dtype=torch.int64).view(1, bits, 1)
    bitv = ((c.unsqueeze(1) >> shifts) & 1).reshape(-1, 32, c.shape[-1])      # [W, 32, C]
    weights = (1 << torch.arange(32, dtype=torch.int64)).view(1, 32, 1)
    words = (bitv * weights).sum(dim=1)                                        # [W, C] 0..2^32-1
    return (words - ((words >> 31) << 32)).to(torch.int32)                     # two's complement


# ---- AWQ: 8 nibbles along N, interleaved ----------------------------------------------------------
def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """AWQ qweight/qzeros [R, N/8] int32 -> uint8 [R, N] in logical column order."""
    w = _as_i32(words, "AWQ packed tensor")
    shifts = torch.tensor([4 * s for s in AWQ_REVERSE], dtype=torch.int32)  # column offset j -> shift
    vals = (w.unsqueeze(-1) >> shifts) & 0xF                                 # [R, N/8, 8]
    return vals.reshape(w.shape[0], -1).to(torch.uint8)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [R, N] (0..15) -> AWQ int32 [R, N/8]: nibble slot i holds column 8c + AWQ_ORDER[i]."""
    r, n = codes.shape
    if n % 8:
        raise CheckpointError(f"AWQ packs 8 values per int32 along N; N={n} is not a multiple of 8")
    c = codes.to(torch.int64).reshape(r, n // 8, 8)[..., list(AWQ_ORDER)]      # slot order
    words = (c << (4 * torch.arange(8, dtype=torch.int64))).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)


# ---- bitsandbytes 4-bit: flat bytes, high nibble first ---------------------------------------------
def unpack_bnb4(data: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 [numel/2] or [numel/2, 1] -> uint8 codes [numel]; element 2i is the high nibble of byte i."""
    b = data.reshape(-1)
    if b.dtype != torch.uint8:
        raise CheckpointError(f"bitsandbytes 4-bit weight has dtype {b.dtype}; expected uint8")
    if b.numel() * 2 != numel:
        raise CheckpointError(f"bitsandbytes 4-bit weight holds {b.numel() * 2} codes; expected {numel}")
    return torch.stack([b >> 4, b & 0xF], dim=-1).reshape(-1)


def pack_bnb4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (even count) -> uint8 [numel/2, 1], even element high."""
    c = codes.reshape(-1, 2).to(torch.uint8)
    return ((c[:, 0] << 4) | c[:, 1]).reshape(-1, 1)


# ---- GGUF Q4_0 / Q4_1 (and the low nibbles of Q5_0 / Q5_1) -----------------------------------------
def unpack_gguf_q4(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 16] block nibbles -> uint8 [..., 32]: byte j holds element j (low), j+16 (high)."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def pack_gguf_q4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 32] (0..15) -> [..., 16] bytes in the Q4_0 order."""
    return (codes[..., :16] & 0xF) | (codes[..., 16:] << 4)
