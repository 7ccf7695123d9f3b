"""quark_int4fp8_moe (FORMATS.md §2.11): online, no checkpoint config, dynamic activations only.

Linear layers are Fp8LinearMethod in SGLang: per-channel e4m3 weights quantized at load with dynamic per-token
e4m3 activations, exactly online fp8. The MoE half (experts quantized to int4 packed in int32 with fp8 scales,
for aiter's fused_moe) comes with the MoE layer; this file serves the linear part on every platform.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantrt.errors import ConfigError
from quantrt.quant.format import register_format
from quantrt.quant.formats.fp8 import Fp8Format

if TYPE_CHECKING:
    from quantrt.server_args import ServerArgs


@register_format
class QuarkInt4Fp8MoeFormat(Fp8Format):
    """Online: linears as online fp8 (per-channel e4m3 weights, per-token dynamic e4m3 activations)."""

    name = "quark_int4fp8_moe"
    online = True

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> QuarkInt4Fp8MoeFormat:
        if qcfg:
            raise ConfigError("quark_int4fp8_moe quantizes a float checkpoint at load time; this checkpoint "
                              f"already has a quantization config ({qcfg.get('quant_method')})")
        return cls(serialized=False)

    def describe(self) -> str:
        return "quark_int4fp8_moe (online: linears fp8 per-channel with dynamic per-token activations)"
