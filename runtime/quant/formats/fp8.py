"""fp8 (HF `quant_method: "fp8"`, FORMATS.md §2.4): per-tensor or 128x128-block scaled e4m3/e5m2
checkpoints, and online fp8 (`--quantization fp8` on a float checkpoint: per-channel e4m3 weights,
dynamic per-token e4m3 activations).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from quantrt.errors import CheckpointError, ConfigError
from quantrt.quant.format import QuantFormat, register_format
from quantrt.quant.quantize import quantize_fp8
from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, ScaleGranularity

if TYPE_CHECKING:
    from quantrt.server_args import ServerArgs

FP8_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACT_DTYPE = torch.float8_e4m3fn
# checkpoint shard -> fused module name, so an ignore list may name either (fused-shard aware)
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def _check_scale(prefix: str, name: str, t: torch.Tensor, want: tuple[int, ...],
                 ue8m0: bool = False) -> torch.Tensor:
    """Validate one scale tensor; return it as fp32 with shape `want` ([] accepts [] or [1])."""
    full = f"{prefix}.{name}"
    if t.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{full} has dtype {t.dtype}; expected a float scale (float32/bfloat16/float16)")
    shape = tuple(t.shape)
    if shape != want and not (want == () and shape == (1,)):
        raise CheckpointError(f"{full} has shape {shape}, expected {want or '[] (a scalar)'}")
    s = t.to(torch.float32).reshape(want)
    if not torch.isfinite(s).all():
        raise CheckpointError(f"{full} contains NaN or inf")
    if (s < 0).any():
        raise CheckpointError(f"{full} contains negative scales (min {s.min().item():g})")
    if ue8m0:
        mant, _ = torch.frexp(s)
        if ((mant != 0.5) & (s != 0)).any():
            raise CheckpointError(f"{full}: scale_fmt is ue8m0 but the scales are not powers of two")
    return s


@register_format
class Fp8Format(QuantFormat):
    """Serialized fp8 checkpoints (per-tensor or block) and online fp8 quantization."""

    name = "fp8"
    online = True

    def __init__(self, *, serialized: bool, static: bool = False, block: tuple[int, int] | None = None,
                 ignored: tuple[str, ...] = (), ue8m0: bool = False, quantize_lm_head: bool = False):
        self.serialized = serialized
        self.static = static
        self.block = block
        self.ignored = ignored
        self.ue8m0 = ue8m0
        self.quantize_lm_head = quantize_lm_head
        self._input_scales: dict[str, torch.Tensor] = {}   # prefix -> scalar fp32 (static only)

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> Fp8Format:
        """{} -> online; else the checkpoint's quantization_config (quant_method "fp8")."""
        if not qcfg or "quant_method" not in qcfg:
            return cls(serialized=False)
        method = str(qcfg["quant_method"]).lower()
        if "fp8" not in method or "mxfp8" in method:
            raise ConfigError(f"fp8 format got quantization_config quant_method={method!r}")
        scheme = qcfg.get("activation_scheme")
        if scheme not in ("static", "dynamic"):
            raise ConfigError(f"fp8 quantization_config needs activation_scheme 'static' or 'dynamic', "
                              f"got {scheme!r}")
        block = qcfg.get("weight_block_size")
        if block is not None:
            if (not isinstance(block, (list, tuple)) or len(block) != 2
                    or not all(isinstance(b, int) and b > 0 for b in block)):
                raise ConfigError(f"fp8 weight_block_size must be two positive ints like [128, 128], "
                                  f"got {block!r}")
            if scheme != "dynamic":
                raise ConfigError(f"block-wise fp8 (weight_block_size {list(block)}) requires "
                                  f"activation_scheme 'dynamic', got {scheme!r}")
            block = (int(block[0]), int(block[1]))
        ignored = tuple(qcfg.get("ignored_layers") or ()) + tuple(qcfg.get("modules_to_not_convert") or ())
        return cls(serialized=True, static=scheme == "static", block=block, ignored=ignored,
                   ue8m0=qcfg.get("scale_fmt") == "ue8m0", quantize_lm_head=bool(qcfg.get("lm_head")))

    def describe(self) -> str:
        if not self.serialized:
            return "fp8 (online: per-channel e4m3 weights, dynamic per-token e4m3 activations)"
        if self.block:
            return f"fp8 (block {self.block[0]}x{self.block[1]}, dynamic per-token-group activations)"
        return f"fp8 (per-tensor, {'static' if self.static else 'dynamic per-token'} e4m3 activations)"

    # ---- which layers, which tensors ---------------------------------------------------------
    def is_quantized(self, prefix: str) -> bool:
        """lm_head stays float unless the config says `lm_head: true`; ignore lists match as substrings
        of the shard prefix or of its fused name (q_proj -> qkv_proj, gate_proj -> gate_up_proj)."""
        last = prefix.rsplit(".", 1)[-1]
        if last == "lm_head" and not self.quantize_lm_head:
            return False
        names = [prefix]
        if last in _FUSED:
            names.append(re.sub(rf"{last}$", _FUSED[last], prefix))
        return not any(ign in name for ign in self.ignored for name in names)

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        if not self.serialized:
            return frozenset({"weight"}), frozenset()
        if self.block:
            return frozenset({"weight", "weight_scale_inv"}), frozenset()
        if self.static:
            return frozenset({"weight", "weight_scale", "input_scale"}), frozenset()
        return frozenset({"weight", "weight_scale"}), frozenset({"input_scale"})  # unused when dynamic

    # ---- conversion --------------------------------------------------------------------------
    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor],
                    shape: tuple[int, int]) -> FloatWeight:
        """weight [N, K] (+ scales) -> FloatWeight; online: float weight -> per-channel e4m3."""
        w = tensors["weight"]
        if tuple(w.shape) != tuple(shape):
            raise CheckpointError(f"{prefix}.weight has shape {tuple(w.shape)}, expected {tuple(shape)}")
        if not self.serialized:
            if w.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{prefix}.weight has dtype {w.dtype}; online fp8 quantizes "
                                      f"float32/bfloat16/float16 checkpoints")
            return quantize_fp8(w, ScaleGranularity.CHANNEL)
        if w.dtype not in FP8_WEIGHT_DTYPES:
            raise CheckpointError(f"{prefix}.weight has dtype {w.dtype}; fp8 checkpoints store "
                                  f"float8_e4m3fn or float8_e5m2")
        n, k = shape
        if self.block:
            bn, bk = self.block
            s = _check_scale(prefix, "weight_scale_inv", tensors["weight_scale_inv"],
                             (-(-n // bn), -(-k // bk)), self.ue8m0)
            return FloatWeight(w, s, ScaleGranularity.BLOCK, self.block)
        s = _check_scale(prefix, "weight_scale", tensors["weight_scale"], (), self.ue8m0)
        if self.static:
            xs = _check_scale(prefix, "input_scale", tensors["input_scale"], ())
            if xs.item() == 0:
                raise CheckpointError(f"{prefix}.input_scale is 0")
            self._input_scales[prefix] = xs
        return FloatWeight(w, s, ScaleGranularity.TENSOR)

    def act_scheme(self, prefix: str) -> ActScheme:
        """Online and per-tensor dynamic: per-token e4m3; block: per-token-group of bk; static: the
        shard's own input_scale (fused shards: merge with quantrt.quant.merge.merge_act_schemes)."""
        if self.block:
            return ActScheme(ActKind.DYNAMIC_GROUP, ACT_DTYPE, group=self.block[1])
        if self.static:
            if prefix not in self._input_scales:
                raise CheckpointError(f"{prefix}: act_scheme asked before its input_scale was loaded")
            return ActScheme(ActKind.STATIC_TENSOR, ACT_DTYPE, scale=self._input_scales[prefix])
        return ActScheme(ActKind.DYNAMIC_TOKEN, ACT_DTYPE)
