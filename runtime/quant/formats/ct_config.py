"""compressed-tensors `quantization_config` parsing and layer matching (FORMATS.md §2.5).

`config_groups` map target lists to a scheme (weights / input_activations QuantizationArgs and an
optional per-group `format`); `ignore` removes layers. Targets and ignore entries are exact layer
names, the class name `Linear` (every linear layer), or `re:<regex>` matched with `re.match` against
the layer's checkpoint name (our shard prefixes are checkpoint names: `model.layers.0.self_attn.q_proj`,
so fused q/k/v and gate/up shards are matched one by one, as SGLang does after expanding them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from quantrt.errors import ConfigError

FORMATS = ("dense", "int-quantized", "float-quantized", "naive-quantized", "pack-quantized",
           "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp8-quantized", "marlin-24",
           "mixed-precision", "sparse-24-bitmask")
BUILT_FORMATS = ("int-quantized", "float-quantized", "naive-quantized", "pack-quantized", "nvfp4-pack-quantized")


@dataclass(frozen=True)
class QArgs:
    """The QuantizationArgs fields we use."""

    num_bits: int = 8
    type: str = "int"                 # int | float
    symmetric: bool = True
    group_size: int | None = None
    strategy: str = "tensor"          # tensor | channel | group | block | token | tensor_group
    block_structure: tuple[int, int] | None = None
    dynamic: bool = False
    actorder: str | None = None

    @classmethod
    def parse(cls, d: dict[str, Any] | None, where: str) -> QArgs | None:
        if not d:
            return None
        if not isinstance(d, dict):
            raise ConfigError(f"compressed-tensors {where} must be a mapping, got {d!r}")
        block = d.get("block_structure")
        strategy = d.get("strategy") or ("group" if d.get("group_size") else "tensor")
        try:
            return cls(int(d.get("num_bits", 8)), str(d.get("type", "int")), bool(d.get("symmetric", True)),
                       int(d["group_size"]) if d.get("group_size") else None, str(strategy),
                       (int(block[0]), int(block[1])) if block else None, bool(d.get("dynamic", False)),
                       d.get("actorder"))
        except (TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"compressed-tensors {where}: malformed quantization args {d!r} ({e})") from None


@dataclass(frozen=True)
class CtScheme:
    """One config group: what its weights and input activations are, and how they are stored."""

    group: str
    format: str
    weights: QArgs
    inputs: QArgs | None

    def describe(self) -> str:
        w = self.weights
        kind = "fp" if w.type == "float" else ("int" if w.symmetric else "uint")
        a = "16" if self.inputs is None else f"{self.inputs.num_bits}{'-static' if not self.inputs.dynamic else ''}"
        return f"{self.group}: {self.format} W{w.num_bits}A{a} {kind} {w.strategy}"


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == "Linear" or name == pattern


@dataclass
class CtConfig:
    schemes: list[tuple[tuple[str, ...], CtScheme]]
    ignore: tuple[str, ...]
    kv_cache_scheme: dict[str, Any] | None

    @classmethod
    def parse(cls, qcfg: dict[str, Any]) -> CtConfig:
        groups = qcfg.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ConfigError("compressed-tensors quantization_config has no config_groups")
        default_fmt = str(qcfg.get("format") or "")
        schemes = []
        for name, g in groups.items():
            if not isinstance(g, dict) or not g.get("targets"):
                raise ConfigError(f"compressed-tensors config group {name!r} has no targets")
            fmt = str(g.get("format") or default_fmt)
            if fmt not in FORMATS:
                raise ConfigError(f"compressed-tensors config group {name!r}: unknown format {fmt!r}; "
                                  f"choose one of: {', '.join(FORMATS)}")
            w = QArgs.parse(g.get("weights"), f"config group {name!r} weights")
            if w is None:
                raise ConfigError(f"compressed-tensors config group {name!r} has no weights scheme")
            schemes.append((tuple(g["targets"]), CtScheme(name, fmt, w,
                                                          QArgs.parse(g.get("input_activations"),
                                                                      f"config group {name!r} input_activations"))))
        for key in ("sparsity_config", "transform_config"):
            if qcfg.get(key):
                raise ConfigError(f"compressed-tensors {key} is not supported yet (quantrt reads quantized, "
                                  f"dense-layout checkpoints)")
        return cls(schemes, tuple(qcfg.get("ignore") or ()), qcfg.get("kv_cache_scheme") or None)

    def scheme_for(self, name: str) -> CtScheme | None:
        """The scheme of the layer `name`, or None when it is ignored or no group targets it."""
        if any(_matches(name, p) and p != "Linear" for p in self.ignore):
            return None
        # SGLang prefers an exact name, then a regex, then a class-name target
        for kind in ("exact", "re", "Linear"):
            for targets, scheme in self.schemes:
                for t in targets:
                    is_kind = ("re" if t.startswith("re:") else "Linear" if t == "Linear" else "exact") == kind
                    if is_kind and _matches(name, t):
                        return scheme
        return None
