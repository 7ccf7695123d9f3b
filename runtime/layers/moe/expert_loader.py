"""Strict loading of one MoE layer's expert tensors, in either checkpoint layout:

- per expert:  `<prefix>.experts.{e}.{gate|up|down}.{suffix}` with the names of the family
  (gate_proj/up_proj/down_proj for Qwen/DeepSeek, w1/w3/w2 for Mixtral); suffixes are what the
  quantization format expects (`weight`, or `weight` + `weight_scale`, `qweight` + `scales` ...),
  and each expert projection becomes a canonical weight through the format;
- fused (transformers v5): `<prefix>.experts.gate_up_proj` [E, 2I, H] (gate rows first) and
  `<prefix>.experts.down_proj` [E, H, I], dense;
- stacked per projection (GGUF `ffn_{gate,up,down}_exps`, named by quantrt.loader.gguf_names):
  `<prefix>.experts.{gate|up|down}.{suffix}` with a leading expert dim [E, ...] on every tensor but
  scalars (a GGML type id shared by all experts); split here into the per-expert path.
"""

from __future__ import annotations

import torch

from quantrt.errors import CheckpointError
from quantrt.quant.weights import WEIGHT_ONLY, ActScheme, DenseWeight, QuantizedWeight

PROJS = ("gate", "up", "down")


class ExpertLoader:
    """Collects tensors; `weights()` returns per expert (gate, up, down) canonical weights."""

    def __init__(self, prefix: str, num_experts: int, hidden: int, inter: int, names: tuple[str, str, str]):
        self.prefix, self.e, self.h, self.i = prefix, num_experts, hidden, inter
        self.names = dict(zip(names, PROJS))                    # checkpoint name -> gate|up|down
        self.pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self.done: dict[tuple[int, str], QuantizedWeight] = {}
        self.acts: dict[tuple[int, str], ActScheme] = {}
        self.fused: dict[str, torch.Tensor] = {}

    def _shape(self, proj: str) -> tuple[int, int]:
        return (self.h, self.i) if proj == "down" else (self.i, self.h)

    def _expected(self, fmt, lin_prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        if fmt is None or not fmt.is_quantized(lin_prefix):
            return frozenset({"weight"}), frozenset()
        return fmt.tensor_names(lin_prefix)

    def add(self, rel: str, t: torch.Tensor, fmt) -> bool:
        """rel: the name after `<prefix>.experts.`; False when it is not an expert tensor."""
        parts = rel.split(".")
        if len(parts) == 1 and parts[0] in ("gate_up_proj", "down_proj"):
            want = (self.e, 2 * self.i, self.h) if parts[0] == "gate_up_proj" else (self.e, self.h, self.i)
            if tuple(t.shape) != want:
                raise CheckpointError(f"{self.prefix}.experts.{rel} has shape {tuple(t.shape)}, expected {want}")
            self.fused[parts[0]] = t
            return True
        if len(parts) >= 2 and parts[0] in self.names:                     # stacked [E, ...]
            if t.dim() and t.shape[0] != self.e:
                raise CheckpointError(f"{self.prefix}.experts.{rel} stacks {t.shape[0]} experts; the model has {self.e}")
            for e in range(self.e):
                self.add(f"{e}.{rel}", t[e] if t.dim() else t, fmt)
            return True
        if len(parts) < 3 or not parts[0].isdigit() or parts[1] not in self.names:
            return False
        e, proj, suffix = int(parts[0]), self.names[parts[1]], ".".join(parts[2:])
        lin = f"{self.prefix}.experts.{parts[0]}.{parts[1]}"
        if e >= self.e:
            raise CheckpointError(f"tensor {lin}.{suffix}: expert {e} does not exist (the model has {self.e})")
        req, opt = self._expected(fmt, lin)
        if suffix not in req | opt:
            raise CheckpointError(f"unexpected tensor {lin}.{suffix}: {lin} expects {', '.join(sorted(req | opt))}")
        got = self.pending.setdefault((e, proj), {})
        if suffix in got or (e, proj) in self.done:
            raise CheckpointError(f"tensor {lin}.{suffix} appears twice in the checkpoint")
        got[suffix] = t
        if req <= got.keys():
            self.done[(e, proj)] = self._make(fmt, lin, proj, self.pending.pop((e, proj)))
            self.acts[(e, proj)] = fmt.act_scheme(lin) if fmt is not None and fmt.is_quantized(lin) else WEIGHT_ONLY
        return True

    def _make(self, fmt, lin: str, proj: str, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        shape = self._shape(proj)
        if fmt is None or not fmt.is_quantized(lin):
            w = tensors["weight"]
            if tuple(w.shape) != shape:
                raise CheckpointError(f"{lin}.weight has shape {tuple(w.shape)}, expected {shape}")
            return DenseWeight(w)
        qw = fmt.make_weight(lin, tensors, shape)
        if tuple(qw.shape) != shape:
            raise CheckpointError(f"{lin}: quantized weight has shape {tuple(qw.shape)}, expected {shape}")
        return qw

    def missing(self) -> list[str]:
        if self.fused and self.done:
            return [f"{self.prefix}.experts: both fused and per-expert tensors (use one layout)"]
        if self.fused:
            return [f"{self.prefix}.experts.{n}" for n in ("gate_up_proj", "down_proj") if n not in self.fused]
        inv = {p: n for n, p in self.names.items()}
        return [f"{self.prefix}.experts.{e}.{inv[p]}" for e in range(self.e) for p in PROJS
                if (e, p) not in self.done]

    def weights(self) -> list[tuple[QuantizedWeight, QuantizedWeight, QuantizedWeight]]:
        """Per expert (gate [I, H], up [I, H], down [H, I])."""
        if self.fused:
            gu, d = self.fused["gate_up_proj"], self.fused["down_proj"]
            return [(DenseWeight(gu[e, : self.i]), DenseWeight(gu[e, self.i:]), DenseWeight(d[e]))
                    for e in range(self.e)]
        return [tuple(self.done[(e, p)] for p in PROJS) for e in range(self.e)]  # type: ignore[misc]

    def act_schemes(self) -> list[tuple[ActScheme, ActScheme, ActScheme]]:
        """Per expert the activation schemes of (gate, up, down) as the format declared them."""
        if self.fused:
            return [(WEIGHT_ONLY,) * 3 for _ in range(self.e)]
        return [tuple(self.acts[(e, p)] for p in PROJS) for e in range(self.e)]  # type: ignore[misc]
