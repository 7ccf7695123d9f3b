"""Marlin serialization of 4-bit GPTQ weights (AutoGPTQ `checkpoint_format: marlin`, older configs
`is_marlin_format: true`; IST-DASLab Marlin's `Layer.pack`). SGLang cannot load these; quantrt undoes
the permutations exactly and serves the canonical IntWeight.

On disk, per linear (K = in features, N = out features, G = group size, G = K for per channel):
| tensor | shape         | dtype | meaning                                                        |
|--------|---------------|-------|----------------------------------------------------------------|
| `B`    | [K/16, 2N]    | int32 | uint4 codes q (w = (q − 8)·s), 16×16 tiles, permuted, packed   |
| `s`    | [K/G, N]      | fp16  | scales, columns permuted within chunks of 64 (32 per channel)  |

Layout of `B` (codes w[k, n] with k < K, n < N):
1. tile: w.reshape(K/16, 16, N/16, 16).permute(0, 2, 1, 3).reshape(K/16, 16N) — row t holds the 16-row
   strip t, tile after tile along N, each 16×16 tile row-major;
2. permute: each consecutive chunk of 1024 values of a row is reordered, new[i] = old[PERM[i]]
   (PERM below: the mma fragment order of one 16×64 block, then the 8-nibble interleave 0,2,4,6,1,3,5,7);
3. pack: 8 values per int32, LSB first (value 8c+j in bits 4j..4j+3 of word c).
Scales: grouped (G < K) rows are flattened and each chunk of 64 reordered, new[i] = old[SCALE_PERM[i]];
per channel (G = K), chunks of 32 with SCALE_PERM_SINGLE. The zero point is implied (8: symmetric only).
Requirements: 16 | K, 64 | N (whole 1024-value chunks), G | K.
"""

from __future__ import annotations

import torch

from quantrt.errors import CheckpointError
from quantrt.quant.formats.packing import pack_lsb, unpack_lsb

TILE = 16


def _perms() -> tuple[list[int], list[int], list[int]]:
    """PERM (1024), SCALE_PERM (64), SCALE_PERM_SINGLE (32): new[i] = old[perm[i]] (Marlin's tables)."""
    perm: list[int] = []
    for i in range(32):                      # 32 threads of a warp
        col = i // 4
        frag = [16 * row + col + 8 * block
                for block in (0, 1)
                for row in (2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1)]
        for j in range(4):                   # 4 tiles of 16x16 (256 values) along N
            perm.extend(p + 256 * j for p in frag)
    inter = (0, 2, 4, 6, 1, 3, 5, 7)
    perm = [perm[8 * c + inter[j]] for c in range(len(perm) // 8) for j in range(8)]
    scale = [i + 8 * j for i in range(8) for j in range(8)]
    single = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    return perm, scale, single


PERM, SCALE_PERM, SCALE_PERM_SINGLE = (torch.tensor(p, dtype=torch.long) for p in _perms())


def _inverse(p: torch.Tensor) -> torch.Tensor:
    return torch.argsort(p)


def check_shape(prefix: str, n: int, k: int, g: int) -> None:
    if k % TILE or n % 64 or k % g:
        raise CheckpointError(f"{prefix}: a Marlin-format layer needs 16 | K, 64 | N and G | K; got N={n}, K={k}, "
                              f"G={g}")


def unpermute_codes(b: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """B int32 [K/16, 2N] -> uint8 codes [N, K] (0..15) in logical order."""
    vals = unpack_lsb(b, 4, dim=1)                                                  # [K/16, 16N] permuted
    vals = vals.reshape(-1, PERM.numel())[:, _inverse(PERM)].reshape(k // TILE, n * TILE)
    w = vals.reshape(k // TILE, n // TILE, TILE, TILE).permute(0, 2, 1, 3).reshape(k, n)
    return w.t().contiguous()


def permute_codes(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of `unpermute_codes`: uint8 codes [N, K] -> B int32 [K/16, 2N]."""
    n, k = codes.shape
    w = codes.t().reshape(k // TILE, TILE, n // TILE, TILE).permute(0, 2, 1, 3).reshape(k // TILE, n * TILE)
    w = w.reshape(-1, PERM.numel())[:, PERM].reshape(k // TILE, n * TILE)
    return pack_lsb(w.contiguous(), 4, dim=1)


def _scale_perm(k: int, g: int) -> torch.Tensor:
    return SCALE_PERM if g != k else SCALE_PERM_SINGLE


def unpermute_scales(s: torch.Tensor, k: int, g: int) -> torch.Tensor:
    """s [K/G, N] (Marlin column order) -> [K/G, N] logical."""
    p = _scale_perm(k, g)
    return s.reshape(-1, p.numel())[:, _inverse(p)].reshape(s.shape)


def permute_scales(s: torch.Tensor, k: int, g: int) -> torch.Tensor:
    """Inverse of `unpermute_scales`."""
    p = _scale_perm(k, g)
    return s.reshape(-1, p.numel())[:, p].reshape(s.shape)
