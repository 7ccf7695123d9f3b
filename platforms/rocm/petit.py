"""petit_nvfp4 on ROCm: ModelOpt NVFP4 linears through Petit's W4A16 kernel (PyPI `petit-kernel`, imported as
`petit_kernel`; FORMATS.md §2.12). MI300 has no fp4 units: Petit dequantizes e2m1 x e4m3 block scales x the
global scale inside its GEMM and multiplies bf16/fp16 activations. The ops (SGLang's petit_utils):
- repack_nvfp4(qweight [N, K/8] int32 (the checkpoint's uint8 [N, K/2] viewed), size_n, size_k) -> Petit layout;
- process_nvfp4_scales(scales [N, K/16] float8_e4m3fn, size_k, size_n) -> Petit's scale layout;
- mul_nvfp4_a16(a [M, K], b, s, global_scale, size_m, size_n, size_k, solution_id=-1) -> [M, N] in a's dtype.
`quantrt.platforms.rocm.emulation.EmulatedPetitOps` implements them on CPU (EMULATED: Petit's internal weight and
scale layouts are not documented, so the emulated repack keeps the checkpoint layout).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any, Protocol

import torch

from quantrt.errors import PlatformError
from quantrt.quant.kernel import LinearKernel, LinearSpec
from quantrt.quant.weights import ActKind, MicroWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

_HALF = (torch.float16, torch.bfloat16)


class PetitOps(Protocol):
    def repack_nvfp4(self, qweight: torch.Tensor, size_n: int, size_k: int) -> torch.Tensor: ...

    def process_nvfp4_scales(self, scales: torch.Tensor, size_k: int, size_n: int) -> torch.Tensor: ...

    def mul_nvfp4_a16(self, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, global_scale: torch.Tensor,
                      size_m: int, size_n: int, size_k: int, solution_id: int = -1) -> torch.Tensor: ...


def load_petit(find_spec: Any = importlib.util.find_spec, import_module: Any = importlib.import_module) -> Any:
    """Import petit_kernel or raise a PlatformError that says what to install (tests inject the finders)."""
    if find_spec("petit_kernel") is None:
        raise PlatformError("--quantization petit_nvfp4 runs NVFP4 checkpoints on ROCm through Petit, but no "
                            "`petit_kernel` module is installed; install petit-kernel for your ROCm (or serve "
                            "the checkpoint with --quantization modelopt_fp4 on NVIDIA)")
    try:
        mod = import_module("petit_kernel")
    except (ImportError, OSError) as e:
        raise PlatformError(f"petit_kernel is installed but failed to import ({type(e).__name__}: {e}); it must "
                            "match the active ROCm runtime") from None
    missing = [op for op in ("repack_nvfp4", "process_nvfp4_scales", "mul_nvfp4_a16") if not hasattr(mod, op)]
    if missing:
        raise PlatformError(f"the installed petit_kernel lacks {', '.join(missing)}")
    return mod


def petit_ops_of(platform: Platform) -> PetitOps | None:
    get = getattr(platform, "petit_ops", None)
    return get() if callable(get) else None


def pack_nvfp4(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes uint8 [N, K] -> the checkpoint's bytes uint8 [N, K/2] (even element in the low nibble)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


class PetitNvfp4Kernel(LinearKernel):
    """NVFP4 (MicroWeight block 16 with a global scale) x bf16/fp16 activations through Petit."""

    name = "petit_nvfp4_a16"

    def __init__(self, ops: PetitOps, w: MicroWeight, device: torch.device):
        n, k = w.shape
        self.ops, self.n, self.k = ops, n, k
        qweight = pack_nvfp4(w.codes).contiguous().view(torch.int32).to(device)        # [N, K/8]
        self.weight = ops.repack_nvfp4(qweight, size_n=n, size_k=k)
        scales = w.scale.to(torch.float8_e4m3fn).to(device)                            # exact: decoded e4m3
        self.scale = ops.process_nvfp4_scales(scales=scales, size_k=k, size_n=n)
        self.global_scale = w.global_scale.to(torch.float32).reshape(()).to(device)   # type: ignore[union-attr]

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        w = spec.weight
        if not isinstance(w, MicroWeight) or w.block != 16 or w.global_scale is None:
            return False, "needs an NVFP4 MicroWeight (block 16 with a global scale)"
        if spec.act.kind is not ActKind.NONE:
            return False, f"Petit is W4A16; activation scheme {spec.act}"
        if spec.compute_dtype not in _HALF:
            return False, f"compute dtype {spec.compute_dtype}: Petit multiplies float16/bfloat16"
        if w.shape[1] % 8:
            return False, f"K={w.shape[1]} is not a multiple of 8 (int32 words of packed fp4)"
        try:
            ops = petit_ops_of(platform)
        except PlatformError as e:
            return False, str(e)
        if ops is None:
            return False, "no Petit on this platform (ROCm with --quantization petit_nvfp4)"
        return True, ""

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> PetitNvfp4Kernel:
        return cls(petit_ops_of(platform), spec.weight, platform.device())  # type: ignore[arg-type]

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        a = x.reshape(-1, self.k)
        y = self.ops.mul_nvfp4_a16(a=a, b=self.weight, s=self.scale, global_scale=self.global_scale,
                                   size_m=a.shape[0], size_n=self.n, size_k=self.k, solution_id=-1)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, self.n)
