"""NVIDIA ModelOpt checkpoints (FORMATS.md §2.6): `modelopt_fp8`, `modelopt_fp4` (NVFP4; the generic
`modelopt` resolves to one of them by quant_algo in quantrt.quant.detect) and `petit_nvfp4` (the same NVFP4 checkpoints, served on ROCm by the
Petit W4A16 kernel, §2.12). Config: `hf_quant_config.json` {"quantization": {quant_algo, group_size,
exclude_modules}} or the flat config.json form (quant_algo, ignore, config_groups[*].weights.group_size).

FP8: `weight` e4m3 [N, K], `weight_scale` fp32 scalar, `input_scale` fp32 scalar (static per-tensor
activations): FloatWeight(TENSOR) + STATIC_TENSOR e4m3 activations (fused shards merge to the max scale).

NVFP4: `weight` uint8 [N, K/2] (two e2m1 codes per byte, even element in the low nibble), `weight_scale`
float8_e4m3fn [N, K/16], `weight_scale_2` fp32 scalar (global), `input_scale` fp32 scalar:
w = e2m1 * float(weight_scale) * weight_scale_2 -> MicroWeight(block 16, global_scale). Activations stay in
the compute dtype on every path quantrt runs (W4A16: the reference kernel and Petit on ROCm); the NVFP4
activation quantization of NVIDIA's SM100 kernels is not emulated, so `input_scale` is only validated.

Exclusion (`exclude_modules` / `ignore`): glob (`*` = any run), full match against the layer prefix or any
dot-separated part of it, after stripping `language_model.`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from quantrt.errors import CheckpointError, ConfigError
from quantrt.quant.format import QuantFormat, register_format
from quantrt.quant.weights import WEIGHT_ONLY, ActKind, ActScheme, FloatWeight, MicroWeight, ScaleGranularity

if TYPE_CHECKING:
    from quantrt.server_args import ServerArgs

HF_QUANT_CONFIG = "hf_quant_config.json"
NVFP4_GROUP = 16


def _algo_of(qcfg: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """The ModelOpt settings: config.json's flat keys, else hf_quant_config.json's `quantization`."""
    keys = ("quant_algo", "exclude_modules", "ignore", "group_size", "config_groups")
    found = {k: qcfg[k] for k in keys if k in qcfg}
    if path is not None and (path / HF_QUANT_CONFIG).is_file() and not found.keys() - {"quant_algo"}:
        try:
            doc = json.loads((path / HF_QUANT_CONFIG).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path / HF_QUANT_CONFIG} is not valid JSON ({e})") from None
        q = doc.get("quantization") if isinstance(doc, dict) else None
        if not isinstance(q, dict):
            raise ConfigError(f"{path / HF_QUANT_CONFIG} has no `quantization` object")
        found = {**q, **found}
    return found


def _group_size(cfg: dict[str, Any]) -> int | None:
    """group_size, which must agree everywhere it appears (ModelOptFp4Config.common_group_size)."""
    sizes = {cfg["group_size"]} if cfg.get("group_size") is not None else set()
    for g in (cfg.get("config_groups") or {}).values():
        w = (g or {}).get("weights") or {}
        if w.get("group_size") is not None:
            sizes.add(w["group_size"])
    if len(sizes) > 1:
        raise ConfigError(f"ModelOpt NVFP4 config has inconsistent group sizes {sorted(sizes)}")
    return next(iter(sizes)) if sizes else None


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(p) for p in pattern.split("*")))


def _scalar(prefix: str, name: str, t: torch.Tensor) -> torch.Tensor:
    """A per-shard scalar scale ([] or [1]) -> fp32 [] (positive, finite)."""
    if t.numel() != 1 or t.dim() > 1 or not t.dtype.is_floating_point:
        raise CheckpointError(f"{prefix}.{name} must be a float scalar, got {t.dtype} {tuple(t.shape)}")
    s = t.to(torch.float32).reshape(())
    if not torch.isfinite(s) or s <= 0:
        raise CheckpointError(f"{prefix}.{name} must be positive and finite, got {s.item():g}")
    return s


class _ModelOptFormat(QuantFormat):
    """Shared: config parsing and the exclusion rule."""

    algo_family: ClassVar[str]

    def __init__(self, algo: str, exclude: list[str]):
        self.algo = algo
        self.exclude = [_glob(p) for p in exclude]
        self._acts: dict[str, ActScheme] = {}

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> QuantFormat:
        path = Path(args.model_path) if args is not None and getattr(args, "model_path", None) else None
        cfg = _algo_of(qcfg or {}, path if path is not None and path.is_dir() else None)
        algo = str(cfg.get("quant_algo") or "").upper()
        if not algo:
            raise ConfigError(f"{cls.name} needs a ModelOpt checkpoint (quant_algo in config.json or "
                              f"{HF_QUANT_CONFIG}); ModelOpt cannot quantize online here")
        family = "FP4" if "FP4" in algo else "FP8" if "FP8" in algo else algo
        if family != cls.algo_family:
            raise ConfigError(f"{cls.name} serves ModelOpt {cls.algo_family} checkpoints, but quant_algo is {algo}")
        exclude = list(cfg.get("exclude_modules") or []) + list(cfg.get("ignore") or [])
        if family == "FP4":
            g = _group_size(cfg)
            if g not in (None, NVFP4_GROUP):
                raise ConfigError(f"{cls.name}: NVFP4 group_size is {g}; only {NVFP4_GROUP} exists")
        return cls(algo, [str(e) for e in exclude])

    def is_quantized(self, prefix: str) -> bool:
        name = prefix.removeprefix("language_model.").replace(".language_model.", ".")
        parts = name.split(".")
        return not any(p.fullmatch(name) or any(p.fullmatch(x) for x in parts) for p in self.exclude)

    def act_scheme(self, prefix: str) -> ActScheme:
        if prefix not in self._acts:
            raise CheckpointError(f"{prefix}: act_scheme asked before its tensors were loaded")
        return self._acts[prefix]

    def describe(self) -> str:
        return f"{self.name} ({self.algo})"


@register_format
class ModelOptFp8Format(_ModelOptFormat):
    """ModelOpt FP8: per-tensor e4m3 weights, static per-tensor e4m3 activations."""

    name = "modelopt_fp8"
    algo_family = "FP8"

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset({"weight", "weight_scale", "input_scale"}), frozenset()

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> FloatWeight:
        w = tensors["weight"]
        if tuple(w.shape) != tuple(shape) or w.dtype != torch.float8_e4m3fn:
            raise CheckpointError(f"{prefix}.weight is {w.dtype} {tuple(w.shape)}; ModelOpt FP8 stores "
                                  f"float8_e4m3fn {tuple(shape)}")
        ws = _scalar(prefix, "weight_scale", tensors["weight_scale"])
        xs = _scalar(prefix, "input_scale", tensors["input_scale"])
        self._acts[prefix] = ActScheme(ActKind.STATIC_TENSOR, torch.float8_e4m3fn, scale=xs)
        return FloatWeight(w, ws, ScaleGranularity.TENSOR)


def unpack_nvfp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> e2m1 codes uint8 [N, K]: element 2j in the low nibble of byte j, 2j+1 in the high."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


@register_format
class ModelOptFp4Format(_ModelOptFormat):
    """ModelOpt NVFP4: e2m1 weights, e4m3 scales per 16, fp32 global scale (W4A16 on quantrt's paths)."""

    name = "modelopt_fp4"
    algo_family = "FP4"

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset({"weight", "weight_scale", "weight_scale_2", "input_scale"}), frozenset()

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> MicroWeight:
        n, k = shape
        if k % NVFP4_GROUP:
            raise CheckpointError(f"{prefix}: K={k} is not a multiple of the NVFP4 block {NVFP4_GROUP}")
        w, s = tensors["weight"], tensors["weight_scale"]
        if w.dtype != torch.uint8 or tuple(w.shape) != (n, k // 2):
            raise CheckpointError(f"{prefix}.weight is {w.dtype} {tuple(w.shape)}; NVFP4 stores uint8 "
                                  f"[{n}, {k // 2}] (two e2m1 codes per byte)")
        if s.dtype != torch.float8_e4m3fn or tuple(s.shape) != (n, k // NVFP4_GROUP):
            raise CheckpointError(f"{prefix}.weight_scale is {s.dtype} {tuple(s.shape)}; NVFP4 stores "
                                  f"float8_e4m3fn [{n}, {k // NVFP4_GROUP}]")
        scale = s.to(torch.float32)
        if not torch.isfinite(scale).all() or (scale < 0).any():
            raise CheckpointError(f"{prefix}.weight_scale holds NaN or negative block scales")
        gs = _scalar(prefix, "weight_scale_2", tensors["weight_scale_2"])
        _scalar(prefix, "input_scale", tensors["input_scale"])
        self._acts[prefix] = WEIGHT_ONLY
        return MicroWeight(unpack_nvfp4(w), scale, NVFP4_GROUP, gs)


@register_format
class PetitNvfp4Format(ModelOptFp4Format):
    """`petit_nvfp4`: ModelOpt NVFP4 checkpoints for ROCm (Petit W4A16 kernel there, reference elsewhere)."""

    name = "petit_nvfp4"
