"""CudaPlatform: NVIDIA GPUs through torch.cuda (NCCL for collectives)."""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

import torch

from quantrt.platform.interface import DeviceCapability, Platform

log = logging.getLogger(__name__)


def _fused_codes() -> bool:
    return os.environ.get("QUANTRT_CUDA_FUSED_CODES", "1") != "0"


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


class CudaPlatform(Platform):
    """NVIDIA CUDA. `capability`/`name` may be injected so tests run without a GPU."""

    name: ClassVar[str] = "cuda"
    device_type: ClassVar[str] = "cuda"
    dist_backend: ClassVar[str] = "nccl"
    linear_kernels_ref: ClassVar[str | None] = "quantrt.platforms.cuda.kernels:CUDA_LINEAR_KERNELS"
    moe_kernels_ref: ClassVar[str | None] = "quantrt.platforms.cuda.kernels:CUDA_MOE_KERNELS"
    decode_attention_ref: ClassVar[str | None] = "quantrt.platforms.cuda.kernels.decode_attention_op:decode_attention"

    def __init__(self, capability: DeviceCapability | None = None, device_name: str | None = None) -> None:
        self._capability = capability
        self._device_name = device_name
        self.gemm_backends: dict[str, Any] = {}   # "fp8"/"fp4" -> GemmBackendChoice, set by check_config

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def memory_info(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info()
        return int(free), int(total)

    def capability(self) -> DeviceCapability | None:
        if self._capability is None:
            major, minor = torch.cuda.get_device_capability()
            self._capability = DeviceCapability(major, minor)
        return self._capability

    def device_name(self) -> str:
        if self._device_name is None:
            self._device_name = torch.cuda.get_device_name()
        return self._device_name

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        cap = self.capability()
        sm = cap.to_int() if cap else 0
        dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16)
        if sm >= 80:
            dtypes += (torch.bfloat16,)
        if sm >= 89:
            dtypes += (torch.float8_e4m3fn, torch.float8_e5m2)
        return dtypes

    def default_mem_fraction(self) -> float:
        return 0.88

    def attention_backends(self) -> list[str]:
        return ["triton", "torch_sdpa"]

    def rms_norm_op(self) -> Any | None:
        """One Triton kernel per RMSNorm (quantrt.platforms.cuda.layer_ops), when Triton is installed."""
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return None
        from quantrt.platforms.cuda.layer_ops import triton_rms_norm

        return triton_rms_norm

    def fused_add_rms_norm_op(self) -> Any | None:
        """Residual add + RMSNorm in one Triton kernel (quantrt.platforms.cuda.layer_ops)."""
        if not _has_triton():
            return None
        from quantrt.platforms.cuda.layer_ops import triton_add_rms_norm

        return triton_add_rms_norm

    def fused_add_rms_norm_codes_op(self) -> Any | None:
        """The same kernel making the next linear's activation codes (QUANTRT_CUDA_FUSED_CODES=0: off, for A/B)."""
        return self.fused_add_rms_norm_op() if _fused_codes() else None

    def act_mul_codes_op(self) -> Any | None:
        """act_mul_op making the down projection's activation codes (QUANTRT_CUDA_FUSED_CODES=0: off)."""
        return self.act_mul_op() if _fused_codes() else None

    def rotary_kv_store_op(self) -> Any | None:
        """Rotary + KV-pool write in one Triton kernel (quantrt.platforms.cuda.kernels.rope_kv_triton)."""
        if not _has_triton():
            return None
        from quantrt.platforms.cuda.kernels.rope_kv_triton import rotary_kv_store

        return rotary_kv_store

    def decode_rotary_attention_op(self) -> Any | None:
        """Decode rotary + KV write + paged attention in one Triton launch (paged_attention_triton);
        QUANTRT_CUDA_FUSED_ATTENTION=0: off (the two launches), for A/B."""
        if not _has_triton() or os.environ.get("QUANTRT_CUDA_FUSED_ATTENTION", "1") == "0":
            return None
        from quantrt.platforms.cuda.kernels.decode_attention_op import decode_rotary_attention

        return decode_rotary_attention

    def act_mul_op(self) -> Any | None:
        """silu/gelu-tanh(gate) * up in one Triton kernel (quantrt.platforms.cuda.layer_ops)."""
        if not _has_triton():
            return None
        from quantrt.platforms.cuda.layer_ops import triton_act_mul

        return triton_act_mul

    def graph_runner(self) -> Any | None:
        """CUDA graphs for decode (quantrt.platforms.cuda.graphs.DecodeGraphRunner)."""
        from quantrt.platforms.cuda.graphs import DecodeGraphRunner

        return DecodeGraphRunner

    def resolve_gemm_backends(self, fp8: str = "auto", fp4: str = "auto") -> dict[str, Any]:
        """{"fp8": GemmBackendChoice, "fp4": ...} for the flag values on this GPU (ConfigError when a
        named backend cannot run here)."""
        from quantrt.platforms.cuda.gemm_backends import (
            probe_env,
            resolve_fp4_gemm_backend,
            resolve_fp8_gemm_backend,
        )

        env = probe_env(self)
        return {"fp8": resolve_fp8_gemm_backend(fp8, env), "fp4": resolve_fp4_gemm_backend(fp4, env)}

    def check_gemm_backends(self, args: Any) -> None:
        self.gemm_backends = self.resolve_gemm_backends(getattr(args, "fp8_gemm_backend", "auto"),
                                                        getattr(args, "fp4_gemm_backend", "auto"))
        for choice in self.gemm_backends.values():
            log.info("%s: %s", choice.flag, choice.describe())

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        try:
            for key, choice in self.resolve_gemm_backends().items():
                d[f"{key}_gemm_backend"] = choice.describe()
        except Exception as e:  # noqa: BLE001 - `quantrt env` reports, it does not fail
            d["gemm_backends"] = f"unresolved: {e}"
        return d
