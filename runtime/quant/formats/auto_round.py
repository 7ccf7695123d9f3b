"""auto-round (FORMATS.md §2.10): `quant_method: "auto-round"` checkpoints are GPTQ- or AWQ-packed
integer weights, W2/W3/W4/W8 A16, with per-layer overrides. Each linear is routed to our GPTQ or AWQ
format with that layer's (bits, group_size, sym).

`packing_format` (what auto-round 0.16 writes; checked against its own exports in tests/test_auto_round.py):
| packing_format                         | tensors                | zeros                              |
|----------------------------------------|------------------------|------------------------------------|
| `auto_round:auto_gptq` (`...:gptq`)    | GPTQ layout            | v1: stored z − 1 (its QuantLinear_zp) |
| `auto_round` (asymmetric export)       | GPTQ layout            | raw z, no offset (= GPTQ v2)       |
| `auto_round:auto_awq` (`...:awq`)      | AWQ GEMM layout        | raw z (AWQ), 4-bit only            |
Plain `quant_method: gptq` / `awq` configs that auto-round exports (`provider: "auto-round"`) are
ordinary GPTQ v1 / AWQ checkpoints and load through those formats. Its other exports are not this
format either: `format="llm_compressor"` (W2..W8 A16) writes a `compressed-tensors` pack-quantized
checkpoint (symmetric scales may be negative: auto-round divides by the signed largest value), and
`format="gguf:q4_0"` / `"gguf:q4_k_s"` … write GGUF files; both load through those formats (tested
against auto-round's own exports in tests/test_auto_round.py). `packing_format: auto_round:llm_compressor`
inside an auto-round config is its NVFP4/MXFP (floating-point data_type) packing: not built yet.

Per-layer config (SGLang `get_layer_config`): an exact `extra_config` name, else the first
`extra_config` key that matches as a regex (`re.search`), overrides bits/group_size/sym; a layer outside
`block_name_to_quantize` (comma string or list of prefixes) stays float; bits ≥ 16 means unquantized.
lm_head is float unless an `extra_config` entry quantizes it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from quantrt.errors import ConfigError, NotSupportedYet
from quantrt.quant.format import QuantFormat, register_format
from quantrt.quant.formats.awq import AwqFormat
from quantrt.quant.formats.gptq import GptqFormat
from quantrt.quant.formats.packing import GPTQ_BITS
from quantrt.quant.weights import WEIGHT_ONLY, ActScheme, IntWeight

if TYPE_CHECKING:
    from quantrt.server_args import ServerArgs

# packing_format -> (layout, v2 zeros)
PACKINGS: dict[str, tuple[str, bool]] = {
    "auto_round:auto_gptq": ("gptq", False), "auto_round:gptq": ("gptq", False),
    "auto_round": ("gptq", True),
    "auto_round:auto_awq": ("awq", False), "auto_round:awq": ("awq", False),
}
BACKENDS = ("auto", "gptq", "gptq:marlin", "awq", "awq:marlin", "marlin")
LayerCfg = tuple[int, int, bool]  # bits, group_size, sym


def _block_names(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:  # nested lists appear for multimodal models: flatten them
        out.extend(_block_names(item) if isinstance(item, list) else [str(item).strip()])
    return tuple(x for x in out if x)


@register_format
class AutoRoundFormat(QuantFormat):
    """auto-round integer checkpoints, routed per layer to GPTQ or AWQ."""

    name = "auto-round"

    def __init__(self, default: LayerCfg, layout: str, v2: bool, blocks: tuple[str, ...],
                 extra: dict[str, dict[str, Any]], packing: str):
        self.default, self.layout, self.v2, self.blocks = default, layout, v2, blocks
        self.extra, self.packing = extra, packing
        self._formats: dict[LayerCfg, QuantFormat] = {}

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> AutoRoundFormat:
        if not qcfg:
            raise ConfigError("auto-round needs an auto-round checkpoint (quantization_config with bits/"
                              "group_size/packing_format)")
        dtype = str(qcfg.get("data_type", "int")).lower()
        if not dtype.startswith("int"):
            raise NotSupportedYet(f"auto-round data_type {dtype!r} is not supported yet; only int is built")
        act_bits = int(qcfg.get("act_bits", 16) or 16)
        if act_bits < 16:
            raise NotSupportedYet(f"auto-round act_bits={act_bits} (quantized activations) is not supported "
                                  f"yet; W2/W3/W4/W8 A16 checkpoints are")
        packing = str(qcfg.get("packing_format", "auto_round:auto_gptq")).lower()
        if packing not in PACKINGS and "llm_compressor" in packing:
            raise NotSupportedYet(f"auto-round packing_format {packing!r} (its NVFP4/MXFP floating-point packing) is "
                                  f"not supported yet; auto-round's integer llm_compressor export is a "
                                  f"compressed-tensors checkpoint, which loads")
        if packing not in PACKINGS:
            raise NotSupportedYet(f"auto-round packing_format {packing!r} is not supported; supported: "
                                  f"{', '.join(PACKINGS)}")
        for key in ("backend", "vllm_backend", "sglang_backend"):
            b = qcfg.get(key)
            if b is not None and str(b).lower() not in BACKENDS:
                raise ConfigError(f"auto-round {key} {b!r} is not one of {', '.join(BACKENDS)}")
        layout, v2 = PACKINGS[packing]
        default = (int(qcfg.get("bits", 4)), int(qcfg.get("group_size", 128)), bool(qcfg.get("sym", True)))
        extra = qcfg.get("extra_config") or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"auto-round extra_config must be a dict of layer -> settings, got {type(extra).__name__}")
        blocks = _block_names(qcfg.get("block_name_to_quantize", qcfg.get("to_quant_block_names")))
        fmt = cls(default, layout, v2, blocks, extra, packing)
        fmt._check(default, "the checkpoint")
        for name in extra:
            cfg = fmt._override(default, extra[name])
            if cfg[0] < 16:
                fmt._check(cfg, f"extra_config[{name!r}]")
        return fmt

    # ---- per-layer configuration ----------------------------------------------------------------
    @staticmethod
    def _override(base: LayerCfg, entry: dict[str, Any]) -> LayerCfg:
        if not isinstance(entry, dict):
            raise ConfigError(f"auto-round extra_config entries must be dicts, got {entry!r}")
        return (int(entry.get("bits", base[0])), int(entry.get("group_size", base[1])),
                bool(entry.get("sym", base[2])))

    def _check(self, cfg: LayerCfg, where: str) -> None:
        bits, g, _ = cfg
        if bits not in GPTQ_BITS:
            raise ConfigError(f"auto-round bits={bits} in {where} is not supported; supported bits: {GPTQ_BITS}")
        if self.layout == "awq" and bits != 4:
            raise ConfigError(f"auto-round bits={bits} in {where}: packing_format {self.packing} is 4-bit only")
        if g != -1 and g <= 0:
            raise ConfigError(f"auto-round group_size={g} in {where} must be positive or -1")

    def layer_config(self, prefix: str) -> LayerCfg | None:
        """(bits, group_size, sym) for the linear at `prefix`, or None when it stays float."""
        entry = self.extra.get(prefix)
        if entry is None:
            entry = next((v for k, v in self.extra.items() if _regex_match(k, prefix)), None)
        if entry is not None:
            cfg = self._override(self.default, entry)
            return None if cfg[0] >= 16 else cfg
        if prefix.rsplit(".", 1)[-1] == "lm_head":
            return None
        if self.blocks and not any(prefix == b or prefix.startswith(b + ".") for b in self.blocks):
            return None
        return None if self.default[0] >= 16 else self.default

    def _format_for(self, prefix: str) -> QuantFormat:
        cfg = self.layer_config(prefix)
        assert cfg is not None, prefix
        if cfg not in self._formats:
            bits, g, sym = cfg
            if self.layout == "awq":
                self._formats[cfg] = AwqFormat.from_config({"bits": bits, "group_size": g, "zero_point": True})
            else:
                self._formats[cfg] = GptqFormat.from_config({
                    "bits": bits, "group_size": g, "sym": sym, "desc_act": False, "lm_head": True,
                    "checkpoint_format": "gptq_v2" if self.v2 else "gptq"})
        return self._formats[cfg]

    # ---- QuantFormat ------------------------------------------------------------------------------
    def describe(self) -> str:
        bits, g, sym = self.default
        return (f"auto-round (w{bits}a16 g{g} {'sym' if sym else 'asym'}, {self.packing} -> {self.layout}"
                f"{' v2 zeros' if self.v2 and self.layout == 'gptq' else ''}"
                f"{f', {len(self.extra)} layer overrides' if self.extra else ''})")

    def is_quantized(self, prefix: str) -> bool:
        return self.layer_config(prefix) is not None

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        return self._format_for(prefix).tensor_names(prefix)

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> IntWeight:
        return self._format_for(prefix).make_weight(prefix, tensors, shape)  # type: ignore[return-value]

    def act_scheme(self, prefix: str) -> ActScheme:
        return WEIGHT_ONLY


def _regex_match(pattern: str, prefix: str) -> bool:
    try:
        return re.search(pattern, prefix) is not None
    except re.error:
        return False
