"""KV-cache dtypes: what `--kv-cache-dtype` resolves to, how many bytes a token costs, and the
reference quantize/dequantize of one page row (FORMATS.md §3).

- fp8 (e4m3 / e5m2): stored as uint8 views of the fp8 bits (index_copy lacks fp8 support on some
  devices); the write path divides by the layer's k_scale/v_scale, the read path multiplies back.
- fp4 (e2m1, SGLang 0.5.9 `fp4_e2m1`): codes packed two per byte (even element in the low nibble)
  plus one scale byte per 16 contiguous elements of the flattened (heads*head_dim) row; the scale is a
  power of two, `2^(byte-127)` with `byte = ceil(log2(amax/6)) + 127`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from quantrt.errors import ConfigError
from quantrt.quant.weights import e2m1_decode

FP4_BLOCK = 16
_E2M1_THRESHOLDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_THRESHOLDS_ON: dict[torch.device, torch.Tensor] = {}


def _thresholds(device: torch.device) -> torch.Tensor:
    """The e2m1 rounding thresholds on `device`, uploaded once (a decode graph cannot capture an upload)."""
    t = _THRESHOLDS_ON.get(device)
    if t is None:
        t = _THRESHOLDS_ON[device] = _E2M1_THRESHOLDS.to(device)
    return t


class KVKind(str, enum.Enum):
    """How the pool stores K/V."""

    PLAIN = "plain"   # a float dtype (fp32/bf16/fp16)
    FP8 = "fp8"       # uint8 bits of an fp8 dtype
    FP4 = "fp4"       # packed e2m1 codes + E8M0-like block-16 scales

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class KVCacheSpec:
    """A resolved --kv-cache-dtype. `dtype`: the element dtype (fp8 flavour for FP8, compute dtype for
    PLAIN, None for FP4); `name`: the flag value as the user spelled it (auto resolved)."""

    name: str
    kind: KVKind
    dtype: torch.dtype | None

    @property
    def quantized(self) -> bool:
        return self.kind is not KVKind.PLAIN

    def bytes_per_element(self) -> float:
        """Storage bytes per K or V element, scales included (fp4: 1/2 + 1/16)."""
        if self.kind is KVKind.FP4:
            return 0.5 + 1.0 / FP4_BLOCK
        if self.kind is KVKind.FP8:
            return 1.0
        return float(torch.empty((), dtype=self.dtype).element_size())

    def bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        """K + V bytes of one token over all layers."""
        return int(2 * num_layers * num_kv_heads * head_dim * self.bytes_per_element())

    def check_shape(self, num_kv_heads: int, head_dim: int) -> None:
        if self.kind is KVKind.FP4 and (head_dim % 2 or (num_kv_heads * head_dim) % FP4_BLOCK):
            raise ConfigError(f"--kv-cache-dtype fp4_e2m1 needs an even head_dim and heads*head_dim divisible "
                              f"by {FP4_BLOCK}; this model has {num_kv_heads} KV heads of {head_dim}")


def resolve_kv_cache_dtype(name: str, compute_dtype: torch.dtype, platform, quant_config: dict | None = None
                           ) -> KVCacheSpec:
    """SGLang's configure_kv_cache_dtype: `auto` is the model dtype unless the checkpoint says its KV
    cache is FP8 (ModelOpt `kv_cache_quant_algo: FP8`); fp8 flavours follow the platform (e4m3fnuz on
    MI300, where e5m2 also becomes the platform e4m3)."""
    if name == "auto":
        algo = str((quant_config or {}).get("kv_cache_quant_algo") or "").upper()
        if algo == "FP8":
            return KVCacheSpec("fp8_e4m3", KVKind.FP8, platform.fp8_dtype())
        return KVCacheSpec("auto", KVKind.PLAIN, compute_dtype)
    if name in ("bf16", "bfloat16"):
        if torch.bfloat16 not in platform.supported_dtypes():
            raise ConfigError(f"--kv-cache-dtype {name}: {platform.name} does not support bfloat16")
        return KVCacheSpec(name, KVKind.PLAIN, torch.bfloat16)
    if name == "fp8_e4m3":
        return KVCacheSpec(name, KVKind.FP8, platform.fp8_dtype())
    if name == "fp8_e5m2":
        fp8 = platform.fp8_dtype()
        return KVCacheSpec(name, KVKind.FP8, torch.float8_e5m2 if fp8 == torch.float8_e4m3fn else fp8)
    if name == "fp4_e2m1":
        return KVCacheSpec(name, KVKind.FP4, None)
    raise ConfigError(f"unknown --kv-cache-dtype {name!r}; options: auto, bf16, bfloat16, fp8_e4m3, "
                      "fp8_e5m2, fp4_e2m1")


# -- fp4 e2m1 with block-16 power-of-two scales ------------------------------------------------
def fp4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H, D] float -> (packed codes [T, H, D/2] uint8, scale bytes [T, H*D/16] uint8)."""
    t, h, d = x.shape
    blocks = x.float().reshape(t, h * d // FP4_BLOCK, FP4_BLOCK)         # [T, NB, 16]
    amax = blocks.abs().amax(-1)                                          # [T, NB]
    exp = torch.ceil(torch.log2(amax.clamp_min(2.0 ** -126) / 6.0)).clamp(-127, 127)
    scaled = blocks / torch.exp2(exp)[..., None]                          # |scaled| <= 6
    mag = torch.bucketize(scaled.abs(), _thresholds(x.device))             # 0..7 (ties round down)
    codes = (mag | ((scaled < 0).to(torch.long) << 3)).to(torch.uint8).reshape(t, h, d)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)                   # even element low nibble
    return packed, (exp + 127).to(torch.uint8)


def fp4_dequantize(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """packed: [..., H, D/2] uint8, scales: [..., H*D/16] uint8 -> [..., H, D] fp32."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)  # [..., H, D]
    vals = e2m1_decode(codes)
    shape = vals.shape
    blocks = vals.reshape(*shape[:-2], -1, FP4_BLOCK)                    # [..., NB, 16]
    scale = torch.exp2(scales.float() - 127.0)[..., None]
    return (blocks * scale).reshape(shape)
