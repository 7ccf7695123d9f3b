"""Packing orders (FORMATS.md §7 fact 4): each unpacker against an independent bit-level model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantrt.errors import CheckpointError
from quantrt.quant.formats.packing import (
    pack_awq,
    pack_bnb4,
    pack_gguf_q4,
    pack_lsb,
    unpack_awq,
    unpack_bnb4,
    unpack_gguf_q4,
    unpack_lsb,
)


def _stream_words(values: list[int], bits: int) -> list[int]:
    """Reference: one Python-int little-endian bit stream cut into uint32 words."""
    stream = sum(v << (bits * j) for j, v in enumerate(values))
    n_words = len(values) * bits // 32
    return [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]


def _u32(t: torch.Tensor) -> list[int]:
    return [int(x) & 0xFFFFFFFF for x in t.reshape(-1).tolist()]


def test_awq_interleave_known_word():
    codes = torch.arange(8, dtype=torch.uint8).view(1, 8)       # logical columns 0..7
    word = pack_awq(codes)
    assert _u32(word) == [0x75316420]                            # slot i holds column ORDER[i]
    assert torch.equal(unpack_awq(word), codes)


def test_awq_roundtrip_and_column_order():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (5, 24), generator=g, dtype=torch.uint8)
    words = pack_awq(codes)
    assert words.shape == (5, 3) and words.dtype == torch.int32
    assert torch.equal(unpack_awq(words), codes)
    # column 8c+j sits at nibble slot REVERSE[j]
    for j, slot in enumerate((0, 4, 1, 5, 2, 6, 3, 7)):
        assert int((words[0, 1].item() >> (4 * slot)) & 0xF) == int(codes[0, 8 + j])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_lsb_first_matches_bit_stream(bits):
    g = torch.Generator().manual_seed(bits)
    k, n = 64, 3
    codes = torch.randint(0, 1 << bits, (k, n), generator=g, dtype=torch.uint8)
    words = pack_lsb(codes, bits, dim=0)                         # [K*b/32, N]
    assert words.shape == (k * bits // 32, n)
    for col in range(n):
        assert _u32(words[:, col]) == _stream_words(codes[:, col].tolist(), bits)
    assert torch.equal(unpack_lsb(words, bits, dim=0), codes)
    # along N (qzeros)
    zw = pack_lsb(codes.t().contiguous(), bits, dim=1)           # [N, K*b/32]
    assert torch.equal(unpack_lsb(zw, bits, dim=1), codes.t())


def test_gptq_3bit_straddles_words():
    vals = [0] * 32
    vals[10] = 0b111                                             # bits 30,31 of word 0 and bit 0 of word 1
    words = pack_lsb(torch.tensor(vals, dtype=torch.uint8).view(32, 1), 3, dim=0)
    assert _u32(words) == [0xC0000000, 0x1, 0x0]
    assert unpack_lsb(words, 3, dim=0).view(-1).tolist() == vals


def test_gptq_4bit_sym_v1_zero_word():
    assert unpack_lsb(torch.tensor([[0x77777777]], dtype=torch.int32), 4, dim=1).tolist() == [[7] * 8]


def test_bad_bits_and_truncated_3bit():
    with pytest.raises(CheckpointError, match="bits=5"):
        unpack_lsb(torch.zeros(5, 2, dtype=torch.int32), 5, dim=0)
    with pytest.raises(CheckpointError, match="multiple of 3"):
        unpack_lsb(torch.zeros(4, 2, dtype=torch.int32), 3, dim=0)
    with pytest.raises(CheckpointError, match="int32"):
        unpack_awq(torch.zeros(2, 2, dtype=torch.float16))


def test_bnb_high_nibble_first():
    data = torch.tensor([[0xAB], [0x12]], dtype=torch.uint8)
    assert unpack_bnb4(data, 4).tolist() == [0xA, 0xB, 0x1, 0x2]
    codes = torch.randint(0, 16, (64,), dtype=torch.uint8)
    assert torch.equal(unpack_bnb4(pack_bnb4(codes), 64), codes)
    with pytest.raises(CheckpointError, match="expected 6"):
        unpack_bnb4(data, 6)


def test_gguf_q4_0_order_matches_gguf_package():
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0)        # [2, 2*18]
    blocks = torch.from_numpy(raw.reshape(2, 2, 18).copy())
    d = blocks[..., :2].contiguous().view(torch.float16).float()          # [2, 2, 1]
    q = unpack_gguf_q4(blocks[..., 2:])                                   # [2, 2, 32]
    ours = ((q.float() - 8) * d).reshape(2, 64)
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0)))
    assert torch.equal(pack_gguf_q4(q), blocks[..., 2:])
