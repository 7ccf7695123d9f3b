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
        self.max_positions = max_positions
        self._op = None  # the platform's rotary op (Platform.rotary_op): takes the cached half tables + positions

    def to(self, dtype: torch.dtype, device: torch.device, platform=None) -> RotaryEmbedding:
        self.cos = self.cos.to(device=device, dtype=dtype)
        self.sin = self.sin.to(device=device, dtype=dtype)
        self._op = platform.rotary_op() if platform is not None else None
        return self

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin gathered for `positions`: [T, 1, D] each (computed once per forward batch); with a
        platform rotary op: (positions, None), the op gathers from the cached tables itself."""
        if self._op is not None:
            return positions, None
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def __call__(self, tables: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, H, D]; k: [T, Hkv, D]
        if self._op is not None:
            half = self.cos.shape[-1] // 2
            return self._op(q, k, self.cos[:, :half], self.sin[:, :half], tables[0])
        cos, sin = tables
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
