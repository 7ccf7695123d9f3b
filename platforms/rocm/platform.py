"""RocmPlatform: AMD Instinct GPUs through torch's HIP build (RCCL presents as "nccl")."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from quantrt.platform.checks import ROCM_ALLOWED_QUANTIZATION
from quantrt.platform.interface import DeviceCapability
from quantrt.platforms.cuda.platform import CudaPlatform
from quantrt.platforms.rocm.aiter_layers import AiterLayerOps


def capability_from_arch(arch: str) -> DeviceCapability:
    """gfx arch -> major.minor like torch reports: gfx942 -> 9.4, gfx950 -> 9.5, gfx90a -> 9.0, gfx1100 -> 11.0.

    The last character is the stepping, the one before it the (hex) minor, the rest the major.
    Feature suffixes such as ":sramecc+:xnack-" are ignored.
    """
    core = arch.split(":", 1)[0].strip().lower()
    if not core.startswith("gfx") or len(core) < 6 or not core[3:-2].isdigit():
        raise ValueError(f"not a gfx architecture name: {arch!r}")
    return DeviceCapability(int(core[3:-2]), int(core[-2], 16))


class RocmPlatform(AiterLayerOps, CudaPlatform):
    """AMD ROCm. `arch` (e.g. "gfx942") may be injected so tests run without a GPU."""

    name: ClassVar[str] = "rocm"
    dist_backend: ClassVar[str] = "nccl"
    allowed_quantization: ClassVar[frozenset[str] | None] = ROCM_ALLOWED_QUANTIZATION
    # ROCm's own kernels, then the plain-Triton fp4 linear and fused MoE shared with CUDA (rocm/shared_triton.py)
    linear_kernels_ref: ClassVar[str | None] = "quantrt.platforms.rocm.shared_triton:ROCM_LINEAR_KERNELS_ALL"
    moe_kernels_ref: ClassVar[str | None] = "quantrt.platforms.rocm.shared_triton:ROCM_MOE_KERNELS_ALL"
    # aiter's paged_attention_rocm when aiter is on, else the Triton kernel shared with CUDA
    decode_attention_ref: ClassVar[str | None] = "quantrt.platforms.rocm.aiter_attention:aiter_decode_attention"

    def __init__(self, arch: str | None = None, device_name: str | None = None) -> None:
        super().__init__(device_name=device_name)
        self._arch = arch
        self._aiter: Any = None
        self._petit: Any = None

    def decode_rotary_attention_op(self) -> Any | None:
        """None: the decode attention goes through `decode_attention_ref` (aiter when it is on), so the rotary +
        KV write stays its own op here (the CUDA platform's one-launch fusion never ran on AMD hardware)."""
        return None

    def aiter_ops(self) -> Any:
        """aiter's ops when SGLANG_USE_AITER=1 / QUANTRT_USE_AITER=1, else None (absent aiter = PlatformError)."""
        from quantrt.platforms.rocm.aiter_adapter import RealAiterOps, aiter_requested

        if not aiter_requested():
            return None
        if self._aiter is None:
            self._aiter = RealAiterOps()
        return self._aiter

    def petit_ops(self) -> Any:
        """petit_kernel (NVFP4 W4A16 for petit_nvfp4); absent = PlatformError naming what to install, which the
        Petit kernel turns into its decline reason (the reference kernel then runs, with a warning)."""
        if self._petit is None:
            from quantrt.platforms.rocm.petit import load_petit

            self._petit = load_petit()
        return self._petit

    def check_config(self, args: Any) -> None:
        super().check_config(args)
        self.aiter_ops()  # fail at start-up, not at the first layer, when aiter is asked for but absent

    def arch(self) -> str:
        """The gfx architecture without feature suffixes (MI300 = gfx942, MI350 = gfx950)."""
        if self._arch is None:
            self._arch = torch.cuda.get_device_properties(0).gcnArchName
        return self._arch.split(":", 1)[0]

    def capability(self) -> DeviceCapability | None:
        if self._capability is None:
            self._capability = capability_from_arch(self.arch())
        return self._capability

    def is_fp8_fnuz(self) -> bool:
        """MI300 (gfx94x) computes fp8 as e4m3fnuz/e5m2fnuz (bias 8, no negative zero)."""
        return self.arch().startswith("gfx94")

    def fp8_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fnuz if self.is_fp8_fnuz() else torch.float8_e4m3fn

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
        if self.is_fp8_fnuz():
            dtypes += (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
        elif self.arch().startswith("gfx95"):
            dtypes += (torch.float8_e4m3fn, torch.float8_e5m2)
        return dtypes
