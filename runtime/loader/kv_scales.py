"""KV-cache scales from checkpoints, under every name FORMATS.md §3 lists, routed into the layer's
PagedAttention (`<layer>.self_attn.attn`):

    .k_proj.k_scale / .v_proj.v_scale          ModelOpt
    .k_proj.output_scale / .v_proj.output_scale compressed-tensors, Quark
    .attn.k_scale / .attn.v_scale, .k_scale / .v_scale
    .kv_scale                                   deprecated: one value for both k and v
A value of -1 means 'not calibrated' and becomes 1.0. q_scale / prob_scale (vLLM attention scales)
are accepted and unused: attention here keeps q and P in full precision.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quantrt.errors import CheckpointError
from quantrt.layers.attention import PagedAttention

# (suffix, which scales it sets), longest first so `.k_proj.k_scale` wins over `.k_scale`
_SUFFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (".k_proj.output_scale", ("k",)), (".v_proj.output_scale", ("v",)),
    (".k_proj.k_scale", ("k",)), (".v_proj.v_scale", ("v",)),
    (".attn.kv_scale", ("k", "v")), (".attn.k_scale", ("k",)), (".attn.v_scale", ("v",)),
    (".attn.q_scale", ()), (".attn.prob_scale", ()),
    (".kv_scale", ("k", "v")), (".k_scale", ("k",)), (".v_scale", ("v",)),
    (".q_scale", ()), (".prob_scale", ()),
)


def scale_value(name: str, t: torch.Tensor) -> float:
    """A per-tensor scale as a float; -1 -> 1.0; anything else must be finite and > 0."""
    if not t.dtype.is_floating_point or t.numel() != 1:
        raise CheckpointError(f"KV scale {name} must be one float (per-tensor); got dtype {t.dtype}, "
                              f"shape {tuple(t.shape)}")
    v = float(t.reshape(()).float())
    if v == -1.0:
        return 1.0
    if not math.isfinite(v) or v <= 0:
        raise CheckpointError(f"KV scale {name} is {v}; expected a finite positive value (or -1 for 'unset')")
    return v


class KVScaleRouter:
    """Claims KV-scale tensors for the model's PagedAttention modules; conflicting duplicates are errors."""

    def __init__(self, model: nn.Module):
        self.attn: dict[str, PagedAttention] = {}     # "model.layers.0.self_attn" -> its PagedAttention
        for name, m in model.named_modules():
            if isinstance(m, PagedAttention):
                self.attn[name.rsplit(".", 1)[0] if "." in name else ""] = m
        self.set_by: dict[tuple[str, str], tuple[str, float]] = {}

    def add(self, name: str, t: torch.Tensor) -> bool:
        """True when `name` is a KV scale of one of our attention layers (and was stored)."""
        for suffix, which in _SUFFIXES:
            if not name.endswith(suffix):
                continue
            parent = name[: -len(suffix)]
            if parent not in self.attn:
                continue
            value = scale_value(name, t)
            for w in which:
                prev = self.set_by.get((parent, w))
                if prev is not None and prev[1] != value:
                    raise CheckpointError(f"KV scale {name} = {value:g} conflicts with {prev[0]} = {prev[1]:g}")
                self.set_by[(parent, w)] = (name, value)
                self.attn[parent].set_kv_scale(w, value)
            return True
        return False

    def loaded(self) -> int:
        """How many (layer, k|v) scales the checkpoint provided."""
        return len(self.set_by)
