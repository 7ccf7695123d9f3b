"""Route checkpoint tensors into a model, strictly: every expected tensor must arrive, none may be left.

Plain parameters (norms, embeddings) are copied by name. QuantLinear shards collect the tensors their
format expects; a layer is built (format -> canonical weight -> kernel) as soon as its last tensor
arrives, so memory stays near one layer above the final model size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from quantrt.errors import CheckpointError
from quantrt.layers.linear import QuantLinear
from quantrt.layers.moe.layer import FusedMoE
from quantrt.loader.kv_scales import KVScaleRouter

# Tensors some checkpoints carry that no runtime needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightRouter:
    def __init__(self, model: nn.Module, fmt, platform, dtype: torch.dtype):
        self.fmt, self.platform, self.dtype = fmt, platform, dtype
        self.params = dict(model.named_parameters())
        self.linears: dict[str, tuple[QuantLinear, int]] = {}
        self.pending: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.needed: dict[tuple[int, int], tuple[frozenset[str], frozenset[str]]] = {}
        self.layers: dict[int, QuantLinear] = {}
        for m in model.modules():
            if isinstance(m, QuantLinear):
                self.layers[id(m)] = m
                self.pending[id(m)] = [{} for _ in m.shards]
                for i, prefix in enumerate(m.shard_prefixes()):
                    self.linears[prefix] = (m, i)
                    self.needed[(id(m), i)] = m.expected_tensors(fmt, i)
        self.seen_params: set[str] = set()
        self.kv_scales = KVScaleRouter(model)
        self.moe = {m.prefix: m for m in model.modules() if isinstance(m, FusedMoE)}

    def _route_linear(self, name: str) -> tuple[QuantLinear, int, str] | None:
        parts = name.split(".")
        for cut in range(1, min(4, len(parts))):
            prefix = ".".join(parts[:-cut])
            if prefix in self.linears:
                m, i = self.linears[prefix]
                return m, i, ".".join(parts[-cut:])
        return None

    def _claim_moe(self, name: str, t: torch.Tensor) -> bool:
        if not self.moe:
            return False
        parts = name.split(".")
        for cut in range(1, len(parts)):
            m = self.moe.get(".".join(parts[:cut]))
            if m is not None:
                return m.claim(name, t, self.fmt)
        return False

    def _complete(self, m: QuantLinear, with_optional: bool = True) -> bool:
        """Every required tensor arrived (and, while streaming, every optional one too: an optional
        tensor may still come later in the file, so such layers are built in finish())."""
        return all(self.needed[(id(m), i)][0] <= d.keys()
                   and (not with_optional or self.needed[(id(m), i)][1] <= d.keys())
                   for i, d in enumerate(self.pending[id(m)]))

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.params:
            p = self.params[name]
            if tuple(p.shape) != tuple(t.shape):
                raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.data = t.to(torch.float32) if not t.dtype.is_floating_point else t
            self.seen_params.add(name)
            return
        if self.kv_scales.add(name, t) or self._claim_moe(name, t):
            return
        routed = self._route_linear(name)
        if routed is None:
            if name.endswith(_IGNORED_SUFFIXES):
                return
            raise CheckpointError(f"unexpected tensor {name} in the checkpoint (the model has no such weight)")
        m, i, suffix = routed
        req, opt = self.needed[(id(m), i)]
        if suffix not in req and suffix not in opt:
            raise CheckpointError(f"unexpected tensor {name}: {m.shard_prefix(i)} expects "
                                  f"{', '.join(sorted(req | opt))}")
        if id(m) not in self.pending:
            raise CheckpointError(f"tensor {name} arrives after {m.shard_prefix(i)} was complete "
                                  "(it appears twice in the checkpoint)")
        shard = self.pending[id(m)][i]
        if suffix in shard:
            raise CheckpointError(f"tensor {name} appears twice in the checkpoint")
        shard[suffix] = t
        if self._complete(m):
            m.load(self.pending.pop(id(m)), self.fmt, self.platform, self.dtype)
            del self.layers[id(m)]

    def finish(self) -> None:
        missing = [n for n in self.params if n not in self.seen_params]
        missing += [n for m in self.moe.values() for n in m.missing()]
        for m in [m for m in self.layers.values() if self._complete(m, with_optional=False)]:
            m.load(self.pending.pop(id(m)), self.fmt, self.platform, self.dtype)
            del self.layers[id(m)]
        for m in self.layers.values():
            for i, d in enumerate(self.pending[id(m)]):
                missing += [f"{m.shard_prefix(i)}.{s}" for s in sorted(self.needed[(id(m), i)][0] - d.keys())]
        if missing:
            more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
            raise CheckpointError(f"checkpoint is missing tensors: {', '.join(missing[:8])}{more}")


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], total: int,
                 fmt, platform, dtype: torch.dtype, progress: bool = False) -> None:
    router = WeightRouter(model, fmt, platform, dtype)
    for name, t in tqdm(tensors, total=total, desc="Loading weights", unit="tensor",
                        disable=not progress, leave=False):
        router.add(name, t)
    router.finish()
