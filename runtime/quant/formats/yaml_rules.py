"""`--quantization-config-path rules.yaml`: sglang-jax's per-layer rules (FORMATS.md §5), online.

Schema (checked strictly; `dense:` is accepted as an alias of `linear:`, `weight_qtype`/`act_qtype` as
aliases of `weight_dtype`/`activation_dtype`):

    quantization:
      is_static_checkpoint: false        # true is refused: a quantized checkpoint is detected by itself
      weight_block_size: [bn, bk]        # optional; fp8 only (block scales, per-token-group activations)
      ignored_layers: [names]            # dotted module names, equal or a `.name` suffix
      linear: {rules: [{module_path, weight_dtype, activation_dtype, weight_block_size}, ...]}
      moe: {weight_dtype, activation_dtype}  # the routed experts of every MoE layer

Module paths: a linear's checkpoint name with `/` for `.`, e.g. `model/layers/3/self_attn/q_proj`;
a rule also matches the sglang-jax spelling `model/layers[3]/self_attn/q_proj`. Fused layers are
matched shard by shard (q_proj, k_proj, v_proj; gate_proj, up_proj); `re.match` (anchored at the
start), first matching rule wins, unmatched layers stay float. lm_head is never quantized (in
sglang-jax it is not a linear layer). Weights get per-channel scales, activations per-token dynamic
scales. A rule that matches no layer of the model is an error (`finish_loading`).

Routed experts (`...experts.<e>.<proj>`) follow the `moe:` section only, never the linear rules (as in
sglang-jax, where the MoE layer is not a linear): weight_dtype int8 (per channel) | float8_e4m3fn /
float8_e5m2 (per channel, or block with the top-level weight_block_size) | null/bfloat16 (float),
activation_dtype null | the same family, per-token dynamic. Shared experts are ordinary linears.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quantrt.errors import ConfigError, NotSupportedYet
from quantrt.quant.format import QuantFormat, register_format
from quantrt.quant.formats.w8a8 import check_float_weight, quantize_int8_channel
from quantrt.quant.quantize import quantize_fp8
from quantrt.quant.weights import WEIGHT_ONLY, ActKind, ActScheme, QuantizedWeight, ScaleGranularity

if TYPE_CHECKING:
    from quantrt.server_args import ServerArgs

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "configs"
DTYPES: dict[str, torch.dtype | None] = {
    "int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
    "bfloat16": None, "float32": None,  # no quantization
}
_EXPERT = re.compile(r"\.experts\.\d+\.[^.]+$")   # a routed expert's projection: ...experts.3.gate_proj
_TOP_KEYS = {"is_static_checkpoint", "weight_block_size", "allow_narrow_n_blockwise", "ignored_layers",
             "linear", "dense", "moe", "scale_policy"}


@dataclass(frozen=True)
class Rule:
    module_path: str
    pattern: re.Pattern[str]
    weight: torch.dtype | None
    act: torch.dtype | None
    block: tuple[int, int] | None


def resolve_rules_path(p: str) -> Path:
    """An existing path, else a built-in name (`fp8`, `int8_w8a8.yaml`, ...) from quantrt/configs."""
    path = Path(p)
    if path.exists():
        return path
    for cand in (BUILTIN_DIR / p, BUILTIN_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    builtins = sorted(f.name for f in BUILTIN_DIR.glob("*.yaml"))
    raise ConfigError(f"--quantization-config-path {p}: no such file, and not a built-in config "
                      f"(built-ins: {', '.join(builtins)})")


def _dtype(v: Any, where: str, allow_null: bool) -> torch.dtype | None:
    if v is None and allow_null:
        return None
    if v not in DTYPES:
        opts = ", ".join(DTYPES) + (", null" if allow_null else "")
        raise ConfigError(f"{where}: unknown dtype {v!r}; choose one of: {opts}")
    return DTYPES[v]


def _block(v: Any, where: str) -> tuple[int, int] | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(isinstance(b, int) and b > 0 for b in v):
        raise ConfigError(f"{where}: weight_block_size must be two positive ints like [128, 128], got {v!r}")
    return int(v[0]), int(v[1])


def _rule(i: int, r: Any, src: str, default_block: tuple[int, int] | None) -> Rule:
    where = f"{src}: linear.rules[{i}]"
    if not isinstance(r, dict) or "module_path" not in r:
        raise ConfigError(f"{where} must be a mapping with module_path, weight_dtype, activation_dtype")
    try:
        pat = re.compile(str(r["module_path"]))
    except re.error as e:
        raise ConfigError(f"{where}: module_path {r['module_path']!r} is not a valid regex ({e})") from None
    w = _dtype(r.get("weight_dtype", r.get("weight_qtype")), f"{where} weight_dtype", allow_null=False)
    a = _dtype(r.get("activation_dtype", r.get("act_qtype")), f"{where} activation_dtype", allow_null=True)
    block = _block(r.get("weight_block_size", default_block), where)
    if w is None and a is not None:
        raise ConfigError(f"{where}: activation_dtype {a} needs a quantized weight_dtype")
    if w is not None and a is not None and (w == torch.int8) != (a == torch.int8):
        raise NotSupportedYet(f"{where}: weight {w} with activations {a} mixes int8 and fp8; use the same family")
    if block is not None and w == torch.int8:
        raise NotSupportedYet(f"{where}: block-scaled int8 is recognised but not supported yet (fp8 is)")
    return Rule(str(r["module_path"]), pat, w, a, block)


@register_format
class YamlRulesFormat(QuantFormat):
    name = "yaml_rules"
    online = True

    def __init__(self, rules: list[Rule], ignored: tuple[str, ...], moe: tuple[torch.dtype | None, ...], src: str,
                 block: tuple[int, int] | None = None):
        self.rules, self.ignored, self.moe, self.src, self.block = rules, ignored, moe, src, block
        self.used: set[int] = set()
        self.moe_rule = self._moe_rule()

    def _moe_rule(self) -> Rule | None:
        w, a = self.moe
        if w is None:
            if a is not None:
                raise ConfigError(f"{self.src}: moe activation_dtype {a} needs a quantized moe weight_dtype")
            return None
        if a is not None and (w == torch.int8) != (a == torch.int8):
            raise NotSupportedYet(f"{self.src}: moe weight {w} with activations {a} mixes int8 and fp8; "
                                  f"use the same family")
        return Rule("moe", re.compile("moe"), w, a, None if w == torch.int8 else self.block)

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> YamlRulesFormat:
        import yaml

        p = qcfg.get("path") or (args.quantization_config_path if args is not None else None)
        if not p:
            raise ConfigError("the yaml_rules format needs --quantization-config-path")
        path = resolve_rules_path(str(p))
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        q = doc.get("quantization") if isinstance(doc, dict) else None
        if not isinstance(q, dict):
            raise ConfigError(f"{path}: the top-level key `quantization:` (a mapping) is required")
        unknown = sorted(set(q) - _TOP_KEYS)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) under quantization: {', '.join(unknown)}; "
                              f"allowed: {', '.join(sorted(_TOP_KEYS))}")
        if q.get("is_static_checkpoint"):
            raise ConfigError(f"{path}: is_static_checkpoint: true reads pre-quantized weights; serve such a "
                              f"checkpoint without --quantization-config-path (its quantization_config is detected)")
        linear = q.get("linear", q.get("dense"))
        rules = linear.get("rules") if isinstance(linear, dict) else None
        if not isinstance(rules, list) or not rules:
            raise ConfigError(f"{path}: `linear:` (or `dense:`) with a non-empty `rules:` list is required")
        moe = q.get("moe")
        if not isinstance(moe, dict):
            raise ConfigError(f"{path}: the `moe:` section is required (weight_dtype, activation_dtype), "
                              f"even for dense models")
        moe_d = (_dtype(moe.get("weight_dtype"), f"{path}: moe weight_dtype", True),
                 _dtype(moe.get("activation_dtype"), f"{path}: moe activation_dtype", True))
        block = _block(q.get("weight_block_size"), f"{path}")
        ignored = tuple(re.sub(r"\[(\d+)\]", r".\1", str(n)) for n in q.get("ignored_layers") or ())
        return cls([_rule(i, r, str(path), block) for i, r in enumerate(rules)], ignored, moe_d, str(path), block)

    def describe(self) -> str:
        return f"yaml rules {self.src} ({len(self.rules)} rule(s))"

    def rule(self, prefix: str) -> Rule | None:
        """The first rule matching this linear (the `moe:` section for a routed expert), or None
        (ignored, lm_head, or no rule)."""
        if prefix.rsplit(".", 1)[-1] == "lm_head" or any(
                prefix == n or prefix.endswith("." + n) for n in self.ignored):
            return None
        if _EXPERT.search(prefix):
            return self.moe_rule
        slash = prefix.replace(".", "/")
        jax = re.sub(r"/(\d+)(?=/|$)", r"[\1]", slash)
        for i, r in enumerate(self.rules):
            if r.pattern.match(slash) or r.pattern.match(jax):
                self.used.add(i)
                return r
        return None

    def is_quantized(self, prefix: str) -> bool:
        r = self.rule(prefix)
        return r is not None and r.weight is not None

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset({"weight"}), frozenset()

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor],
                    shape: tuple[int, int]) -> QuantizedWeight:
        r = self.rule(prefix)
        assert r is not None and r.weight is not None
        w = tensors["weight"]
        check_float_weight(prefix, w, shape)
        if r.weight == torch.int8:
            return quantize_int8_channel(w)
        if r.block is not None:
            return quantize_fp8(w, ScaleGranularity.BLOCK, r.block, dtype=r.weight)
        return quantize_fp8(w, ScaleGranularity.CHANNEL, dtype=r.weight)

    def act_scheme(self, prefix: str) -> ActScheme:
        r = self.rule(prefix)
        if r is None or r.act is None:
            return WEIGHT_ONLY
        if r.block is not None:
            return ActScheme(ActKind.DYNAMIC_GROUP, r.act, group=r.block[1])
        return ActScheme(ActKind.DYNAMIC_TOKEN, r.act)

    def finish_loading(self) -> None:
        """Every rule must have matched at least one layer."""
        unused = [f"rules[{i}] module_path {r.module_path!r}" for i, r in enumerate(self.rules) if i not in self.used]
        if unused:
            raise ConfigError(f"{self.src}: {'; '.join(unused)} matched no linear layer of this model "
                              f"(paths look like model/layers/0/self_attn/q_proj)")
