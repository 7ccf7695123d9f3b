"""Rotary position embedding. Frequencies come from transformers' rope helpers (llama3, linear,
yarn, dynamic ...) so every scaling rule matches the reference implementation exactly."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def _rope_params(config: PretrainedConfig, layer_type: str | None) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    return params


class RotaryEmbedding:
    """cos/sin tables for positions; applies neox-style (rotate-half) rotation to q and k."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int,
                 layer_type: str | None = None):
        params = _rope_params(config, layer_type)
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
            scaling = 1.0
        else:
            kw = {"layer_type": layer_type} if layer_type is not None else {}
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **kw)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq.float())            # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)               # [P, D]
        self.cos = emb.cos() * scaling
        self.sin = emb.sin() * scaling
        self._sin_signed = _signed(self.sin)                  # [P, D] = [-sin_lo, sin_hi]: rotate-half's sign
        self.max_positions = max_positions
        self._op = None  # the platform's rotary op (Platform.rotary_op): takes the cached half tables + positions

    def to(self, dtype: torch.dtype, device: torch.device, platform=None) -> RotaryEmbedding:
        self.cos = self.cos.to(device=device, dtype=dtype)
        self.sin = self.sin.to(device=device, dtype=dtype)
        self._sin_signed = _signed(self.sin)
        self._op = platform.rotary_op() if platform is not None else None
        return self

    def half_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [P, D/2] (views; both halves of a neox table are equal): what platform rotary ops read."""
        half = self.cos.shape[-1] // 2
        return self.cos[:, :half], self.sin[:, :half]

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin gathered for `positions`: [T, 1, D] each (computed once per forward batch); with a
        platform rotary op: (positions, None), the op gathers from the cached tables itself."""
        if self._op is not None:
            return positions, None
        return self.cos[positions].unsqueeze(1), self._sin_signed[positions].unsqueeze(1)

    def __call__(self, tables: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, H, D]; k: [T, Hkv, D]
        if self._op is not None:
            return self._op(q, k, *self.half_tables(), tables[0])
        cos, sin_signed = tables
        qk = _adjacent(q, k)
        if qk is not None:  # q and k are neighbouring slices of one qkv row: rotate both in one pass
            r = _rotate(qk, cos, sin_signed)
            return r[:, : q.shape[1]], r[:, q.shape[1]:]
        return _rotate(q, cos, sin_signed), _rotate(k, cos, sin_signed)


def _signed(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def _adjacent(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """[T, H + Hkv, D] view over q [T, H, D] and k [T, Hkv, D] when k directly follows q in every row of
    one buffer (the fused qkv projection's output), else None."""
    if (q.dim() != 3 or k.dim() != 3 or q.dtype != k.dtype or q.stride() != k.stride() or q.stride(2) != 1
            or q.stride(1) != q.shape[2] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]
            or q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
            or k.data_ptr() != q.data_ptr() + q.shape[1] * q.shape[2] * q.element_size()
            or q.stride(0) < (q.shape[1] + k.shape[1]) * q.shape[2]):
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = swap_halves(x) * [-sin_lo, sin_hi]
    swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin_signed)
