"""msModelSlim (Ascend) checkpoints: `quant_model_description.json` maps each tensor name to a type string
(FORMATS.md §2.13). Runs on the reference path everywhere, so an Ascend checkpoint validates on CPU;
the Ascend kernels (quantrt.platforms.ascend.kernels) serve the same canonical weights through the NPU adapter.

Linear types and their meaning (what the NPU computes, written as float math):
- W8A8 (static): x_q = clamp(round(x / input_scale) + input_offset, -128, 127);
  y = deq_scale * (x_q @ W^T + quant_bias). Canonically: IntWeight(W, deq_scale / input_scale), activations
  STATIC_TENSOR int8 with zero point input_offset, and the folded output bias
  deq_scale * (quant_bias + input_offset * rowsum(W)) (what is left of quant_bias once the zero point is
  taken out; the model's own bias, folded in by msModelSlim).
- W8A8_DYNAMIC / W4A4_DYNAMIC: per-token symmetric int8 / int4 activations (npu_dynamic_quant) and
  per-channel weights w = (W - weight_offset) * weight_scale (int4 values held in int8).
- W8A16: weight-only per-channel int8 (npu_weight_quant_batchmatmul).  FLOAT: unquantized.

MoE experts (`<moe>.experts.<e>.<proj>.weight`, vllm-ascend's per-expert names) take the MoE types:
- W8A8_DYNAMIC / W4A4_DYNAMIC: as for linears (per-channel weight_scale / weight_offset [N, 1]).
- W4A8_DYNAMIC: int4 values held one per int8 `weight` [N, K], per-channel `weight_scale` [N, 1] and, when the
  description's `group_size` G > 0, `weight_scale_second` [N, K/G] (and `weight_offset_second`):
  w = W * weight_scale[n] * weight_scale_second[n, k // G] (vllm-ascend multiplies the two into the grouped
  matmul's antiquant scale); per-token int8 activations. The offsets must be zero (the NPU kernel is
  symmetric). The newer layout that packs two int4 per int8 along N with a `scale_bias` is refused.

Anti-outlier checkpoints (msModelSlim's outlier suppression) also list `<norm>.bias` (e.g.
`model.layers.0.input_layernorm.bias`): that RMSNorm computes rmsnorm(x) * w + b. Only the norms the
description names get a bias, and each of them must then find its tensor (norm_biases()).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quantrt.errors import CheckpointError, ConfigError, NotSupportedYet
from quantrt.quant.format import QuantFormat, register_format
from quantrt.quant.weights import WEIGHT_ONLY, ActKind, ActScheme, IntWeight

if TYPE_CHECKING:
    from quantrt.server_args import ServerArgs

DESCRIPTION_FILE = "quant_model_description.json"
LINEAR_TYPES: dict[str, frozenset[str]] = {
    "W8A8": frozenset({"weight", "weight_scale", "weight_offset", "input_scale", "input_offset",
                       "quant_bias", "deq_scale"}),
    "W8A8_DYNAMIC": frozenset({"weight", "weight_scale", "weight_offset"}),
    "W4A4_DYNAMIC": frozenset({"weight", "weight_scale", "weight_offset"}),
    "W8A16": frozenset({"weight", "weight_scale", "weight_offset"}),
}
# Types of MoE expert projections (prefix `<moe>.experts.<e>.<proj>`); W4A8_DYNAMIC's per-group tensors
# are added in tensor_names when the description's group_size is set.
MOE_TYPES: dict[str, frozenset[str]] = {
    "W8A8_DYNAMIC": LINEAR_TYPES["W8A8_DYNAMIC"],
    "W4A4_DYNAMIC": LINEAR_TYPES["W4A4_DYNAMIC"],
    "W4A8_DYNAMIC": frozenset({"weight", "weight_scale", "weight_offset"}),
}
W4A8_GROUP_TENSORS = frozenset({"weight_scale_second", "weight_offset_second"})
# Known to vllm-ascend / msModelSlim but not built for linears here (W4A8_DYNAMIC is built for MoE experts).
KNOWN_UNBUILT = ("W4A8_DYNAMIC", "W4A16", "W8A8_MIX", "W4A4_FLATQUANT_DYNAMIC", "W4A8_MXFP", "W8A8_MXFP8",
                 "W4A4_MXFP4", "W8A8FP8_DYNAMIC")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def find_modelslim_config(path: Path | None, _hf: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """Detection source: the whole description becomes the config, with quant_method "modelslim" injected."""
    if path is None or not (path / DESCRIPTION_FILE).is_file():
        return None
    try:
        desc = json.loads((path / DESCRIPTION_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path / DESCRIPTION_FILE} is not valid JSON: {e}") from None
    if not isinstance(desc, dict):
        raise ConfigError(f"{path / DESCRIPTION_FILE} must hold a JSON object (tensor name -> type)")
    return {**desc, "quant_method": "modelslim"}, DESCRIPTION_FILE


def decode_deq_scale(t: torch.Tensor) -> torch.Tensor:
    """deq_scale [N] -> fp32. fp16 models store int64 whose low 32 bits are the fp32 bit pattern."""
    if t.dtype in _FLOATS:
        return t.to(torch.float32)
    if t.dtype != torch.int64:
        raise CheckpointError(f"deq_scale has dtype {t.dtype}; expected float32 or int64 (packed fp32 bits)")
    low = t & 0xFFFFFFFF
    low = torch.where(low >= 2**31, low - 2**32, low)
    return low.to(torch.int32).view(torch.float32)


def _vec(prefix: str, name: str, t: torch.Tensor, n: int) -> torch.Tensor:
    """[n], [n, 1] or (n == 1) [] -> fp32 [n]."""
    if t.numel() != n or (t.dim() > 1 and tuple(t.shape) != (n, 1)):
        raise CheckpointError(f"{prefix}.{name} has shape {tuple(t.shape)}, expected [{n}] or [{n}, 1]")
    if not torch.isfinite(t.to(torch.float32)).all():
        raise CheckpointError(f"{prefix}.{name} contains NaN or inf")
    return t.to(torch.float32).reshape(n)


def _zero_point(prefix: str, name: str, v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    if not torch.equal(v, v.round()) or (v < lo).any() or (v > hi).any():
        raise CheckpointError(f"{prefix}.{name} must hold integers in [{lo}, {hi}]")
    return v


def _is_expert(prefix: str) -> bool:
    """`model.layers.3.mlp.experts.7.gate_proj` (a routed expert's projection)."""
    parts = prefix.split(".")
    return len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit()


@register_format
class ModelSlimFormat(QuantFormat):
    """Huawei msModelSlim checkpoints (`quant_model_description.json`)."""

    name = "modelslim"

    def __init__(self, description: dict[str, Any]):
        self.desc = description
        self._acts: dict[str, ActScheme] = {}
        self._bias: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> ModelSlimFormat:
        if not qcfg or str(qcfg.get("quant_method", "")).lower() != "modelslim":
            raise ConfigError(f"modelslim needs {DESCRIPTION_FILE} in the model directory "
                              f"(msModelSlim checkpoints cannot be quantized online)")
        return cls(qcfg)

    def describe(self) -> str:
        kinds = sorted({v for k, v in self.desc.items() if k.endswith("proj.weight") and isinstance(v, str)})
        return f"modelslim ({self.desc.get('model_quant_type', '/'.join(kinds) or 'FLOAT')})"

    def norm_biases(self) -> frozenset[str]:
        return frozenset(k[: -len(".bias")] for k in self.desc if k.endswith("norm.bias"))

    def layer_type(self, prefix: str) -> str:
        """The description's type string for `prefix.weight` (lm_head absent from it = FLOAT)."""
        t = self.desc.get(f"{prefix}.weight")
        if t is None:
            if prefix.rsplit(".", 1)[-1] == "lm_head":
                return "FLOAT"
            raise ConfigError(f"{DESCRIPTION_FILE} has no entry for {prefix}.weight")
        t = str(t)
        if _is_expert(prefix):
            if t != "FLOAT" and t not in MOE_TYPES:
                raise (NotSupportedYet if t in LINEAR_TYPES or t in KNOWN_UNBUILT else ConfigError)(
                    f"msModelSlim type {t!r} ({prefix}.weight) is not a MoE expert type quantrt runs "
                    f"(supported for experts: {', '.join(MOE_TYPES)}, FLOAT)")
            return t
        if t != "FLOAT" and t not in LINEAR_TYPES:
            if t in KNOWN_UNBUILT:
                raise NotSupportedYet(f"msModelSlim type {t} ({prefix}.weight) is not supported yet for linear "
                                      f"layers (supported: {', '.join(LINEAR_TYPES)}, FLOAT)")
            raise ConfigError(f"{DESCRIPTION_FILE}: unknown type {t!r} for {prefix}.weight "
                              f"(known: {', '.join(LINEAR_TYPES)}, FLOAT)")
        return t

    def is_quantized(self, prefix: str) -> bool:
        return self.layer_type(prefix) != "FLOAT"

    def group_size(self) -> int:
        """The description's `group_size` (W4A8_DYNAMIC per-group experts); 0 = per-channel."""
        g = self.desc.get("group_size", 0)
        if not isinstance(g, int) or g < 0:
            raise ConfigError(f"{DESCRIPTION_FILE}: group_size must be a non-negative integer, got {g!r}")
        return g

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        kind = self.layer_type(prefix)
        if not _is_expert(prefix):
            return LINEAR_TYPES[kind], frozenset()
        req = MOE_TYPES[kind]
        if kind != "W4A8_DYNAMIC":
            return req, frozenset()
        return (req | W4A8_GROUP_TENSORS if self.group_size() else req), frozenset({"scale_bias"})

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> IntWeight:
        kind = self.layer_type(prefix)
        n, k = shape
        w = tensors["weight"]                                                   # [N, K] int8
        if kind == "W4A8_DYNAMIC":
            return self._w4a8(prefix, tensors, n, k)
        if tuple(w.shape) != (n, k):
            raise CheckpointError(f"{prefix}.weight has shape {tuple(w.shape)}, expected {(n, k)}")
        if w.dtype != torch.int8:
            raise CheckpointError(f"{prefix}.weight has dtype {w.dtype}; msModelSlim {kind} stores int8")
        bits = 4 if kind == "W4A4_DYNAMIC" else 8
        if bits == 4 and (w.min() < -8 or w.max() > 7):
            raise CheckpointError(f"{prefix}.weight: W4A4_DYNAMIC weights must hold int4 values in [-8, 7]")
        scale = _vec(prefix, "weight_scale", tensors["weight_scale"], n)
        offset = _zero_point(prefix, "weight_offset", _vec(prefix, "weight_offset", tensors["weight_offset"], n),
                             -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        if kind == "W8A8":
            return self._static(prefix, tensors, w, scale, offset)
        zero = offset.to(torch.int32)[:, None] if offset.any() else None
        self._acts[prefix] = (WEIGHT_ONLY if kind == "W8A16" else
                              ActScheme(ActKind.DYNAMIC_TOKEN, torch.int4 if bits == 4 else torch.int8))
        return IntWeight(w, scale[:, None], bits, k, zero=zero)

    def _w4a8(self, prefix: str, t: dict[str, torch.Tensor], n: int, k: int) -> IntWeight:
        """MoE W4A8_DYNAMIC: w = W * weight_scale[n] (* weight_scale_second[n, k // G]); int8 per-token acts."""
        w = t["weight"]
        if "scale_bias" in t or tuple(w.shape) == (n // 2, k):
            raise NotSupportedYet(f"{prefix}: this W4A8_DYNAMIC checkpoint uses msModelSlim's newer layout (two "
                                  f"int4 per int8 along N, `scale_bias`), which quantrt does not read yet; "
                                  f"export one int4 value per int8 (weight [{n}, {k}])")
        if tuple(w.shape) != (n, k) or w.dtype != torch.int8:
            raise CheckpointError(f"{prefix}.weight is {w.dtype} {tuple(w.shape)}; W4A8_DYNAMIC stores int8 "
                                  f"[{n}, {k}] holding int4 values")
        if w.min() < -8 or w.max() > 7:
            raise CheckpointError(f"{prefix}.weight: W4A8_DYNAMIC weights must hold int4 values in [-8, 7]")
        scale = _vec(prefix, "weight_scale", t["weight_scale"], n)              # [N]
        if _vec(prefix, "weight_offset", t["weight_offset"], n).any():
            raise CheckpointError(f"{prefix}.weight_offset is non-zero; W4A8_DYNAMIC experts are symmetric "
                                  f"(the NPU grouped matmul takes no weight offset)")
        g = self.group_size()
        if not g:
            self._acts[prefix] = ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8)
            return IntWeight(w, scale[:, None], 4, k)
        if k % g:
            raise CheckpointError(f"{prefix}: group_size {g} does not divide K={k}")
        second = {}
        for name in sorted(W4A8_GROUP_TENSORS):
            v = t[name]
            if tuple(v.shape) != (n, k // g) or not torch.isfinite(v.to(torch.float32)).all():
                raise CheckpointError(f"{prefix}.{name} must be finite [{n}, {k // g}], got {tuple(v.shape)}")
            second[name] = v.to(torch.float32)
        if second["weight_offset_second"].any():
            raise CheckpointError(f"{prefix}.weight_offset_second is non-zero; W4A8_DYNAMIC experts are symmetric")
        self._acts[prefix] = ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8)
        return IntWeight(w, scale[:, None] * second["weight_scale_second"], 4, g)

    def _static(self, prefix: str, t: dict[str, torch.Tensor], w: torch.Tensor, scale: torch.Tensor,
                offset: torch.Tensor) -> IntWeight:
        n, k = w.shape
        if offset.any():
            raise CheckpointError(f"{prefix}.weight_offset is non-zero, but W8A8 (static) runs on "
                                  f"npu_quant_matmul, which has no weight offset")
        in_scale = _vec(prefix, "input_scale", t["input_scale"], 1)
        if in_scale.item() <= 0:
            raise CheckpointError(f"{prefix}.input_scale must be positive, got {in_scale.item():g}")
        in_off = _zero_point(prefix, "input_offset", _vec(prefix, "input_offset", t["input_offset"], 1), -128, 127)
        qb = t["quant_bias"]
        if qb.dtype != torch.int32 or qb.numel() != n:
            raise CheckpointError(f"{prefix}.quant_bias must be int32 [{n}], got {qb.dtype} {tuple(qb.shape)}")
        deq = decode_deq_scale(t["deq_scale"].reshape(-1))
        if deq.numel() != n or not torch.isfinite(deq).all() or (deq <= 0).any():
            raise CheckpointError(f"{prefix}.deq_scale must hold {n} positive finite scales")
        rel = ((deq - in_scale * scale).abs() / deq).max().item()
        if rel > 1e-2:
            raise CheckpointError(f"{prefix}.deq_scale disagrees with input_scale * weight_scale "
                                  f"(max relative difference {rel:.3g})")
        rowsum = w.to(torch.float64).sum(dim=1)                                # [N]
        folded = deq.double() * (qb.reshape(n).double() + in_off.double() * rowsum)
        self._bias[prefix] = folded.to(torch.float32)
        self._acts[prefix] = ActScheme(ActKind.STATIC_TENSOR, torch.int8, scale=in_scale.reshape(()),
                                       zero=in_off.reshape(()))
        return IntWeight(w, (deq / in_scale)[:, None], 8, k)

    def act_scheme(self, prefix: str) -> ActScheme:
        if prefix not in self._acts:
            raise CheckpointError(f"{prefix}: act_scheme asked before its tensors were loaded")
        return self._acts[prefix]

    def output_bias(self, prefix: str) -> torch.Tensor | None:
        return self._bias.get(prefix)
