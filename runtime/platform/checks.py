"""Method x platform compatibility: which quantization methods a platform allows, and SM minimums.

Facts from reference/FORMATS.md §1.3 step 7 (ROCm allow-list) and §4.1 (minimum capability, checked
when the device reports one and the platform is not NPU, with SGLang's error wording).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantrt.errors import PlatformError, choices_error

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

# SGLang 0.5.9 `rocm_supported_quantization` (compressed_tensors is SGLang's own duplicate spelling).
ROCM_ALLOWED_QUANTIZATION: frozenset[str] = frozenset(
    {
        "awq", "gptq", "fp8", "compressed_tensors", "compressed-tensors", "fbgemm_fp8", "w8a8_fp8",
        "petit_nvfp4", "quark", "mxfp4", "auto-round", "quark_int4fp8_moe",
    }
)  # fmt: skip

# `get_min_capability()` per method, as major*10+minor (SGLang 0.5.9 config-level values).
MIN_CAPABILITY: dict[str, int] = {
    "awq": 75, "awq_marlin": 80, "gptq": 60, "gptq_marlin": 80, "marlin": 80,
    "fp8": 80, "mxfp8": 100, "blockwise_int8": 80, "fbgemm_fp8": 80,
    "modelopt": 89, "modelopt_fp8": 89, "modelopt_fp4": 100, "petit_nvfp4": 90,
    "w8a8_int8": 75, "w8a8_fp8": 89, "moe_wna16": 70, "compressed-tensors": 70,
    "qoq": 80, "w4afp8": 90, "mxfp4": 80, "bitsandbytes": 70, "gguf": 60, "auto-round": 60,
    "quark": 70, "quark_int4fp8_moe": 70, "modelslim": 0,
}  # fmt: skip

_DISPLAY = {"cuda": "CUDA", "rocm": "ROCm", "npu": "Ascend NPU", "xpu": "XPU", "cpu": "CPU"}


def _choices() -> tuple[str, ...]:
    from quantrt.choices import QUANTIZATION_CHOICES

    return tuple(str(c) for c in QUANTIZATION_CHOICES)


def known_methods() -> tuple[str, ...]:
    """CLI choices first, then methods reachable only through a checkpoint config (fbgemm_fp8 ...)."""
    choices = _choices()
    return choices + tuple(m for m in MIN_CAPABILITY if m not in choices)


def min_capability(method: str) -> int | None:
    """SGLang's minimum compute capability (major*10+minor) for `method`, or None when unknown."""
    return MIN_CAPABILITY.get(method)


def allowed_methods(platform: Platform) -> list[str]:
    """The --quantization choices this platform allows, in CLI order."""
    allowed = platform.allowed_quantization
    return [m for m in _choices() if allowed is None or m in allowed]


def check_method_allowed(platform: Platform, method: str) -> None:
    """Raise PlatformError if `method` is not allowed on `platform` or the device is too old for it."""
    if method not in known_methods():
        raise choices_error("--quantization", method, _choices())
    allowed = platform.allowed_quantization
    display = _DISPLAY.get(platform.name, platform.name)
    if allowed is not None and method not in allowed:
        raise PlatformError(
            f"{method} quantization is currently not supported in {display}. "
            f"Methods allowed on {display}: {', '.join(allowed_methods(platform))}."
        )
    if platform.name == "npu":  # SGLang skips the capability check on NPU
        return
    cap = platform.capability()
    needed = min_capability(method)
    if cap is not None and needed is not None and cap.to_int() < needed:
        raise PlatformError(
            f"The quantization method {method} is not supported for the current GPU. "
            f"Minimum capability: {needed}. Current capability: {cap.to_int()}."
        )


def check_quantization_allowed(platform: Platform, args: Any) -> None:
    """Check `args.quantization` (a ServerArgs or anything with that attribute; None = unquantized)."""
    method = getattr(args, "quantization", None)
    if method:
        check_method_allowed(platform, str(method))
