"""CpuPlatform: the always-available fallback (gloo for collectives, torch threads for compute)."""

from __future__ import annotations

import importlib.util
import platform as _pyplatform
from pathlib import Path
from typing import ClassVar

import torch

from quantrt.platform.interface import Platform
from quantrt.quant.kernel import LinearKernel
from quantrt.quant.weights import QuantizedWeight


class CpuPlatform(Platform):
    """Plain CPU. `cpuinfo`/`meminfo` paths may be injected for tests."""

    name: ClassVar[str] = "cpu"
    device_type: ClassVar[str] = "cpu"
    dist_backend: ClassVar[str] = "gloo"
    allowed_quantization: ClassVar[frozenset[str] | None] = None  # every method has a reference path
    linear_kernels_ref: ClassVar[str | None] = "quantrt.platforms.xpu.cpu_kernels:CPU_LINEAR_KERNELS"
    moe_kernels_ref: ClassVar[str | None] = "quantrt.platforms.xpu.cpu_moe_kernels:CPU_MOE_KERNELS"

    def __init__(
        self,
        cpuinfo: str | Path = "/proc/cpuinfo",
        meminfo: str | Path = "/proc/meminfo",
        use_psutil: bool = True,
    ) -> None:
        self._cpuinfo = Path(cpuinfo)
        self._meminfo = Path(meminfo)
        self._use_psutil = use_psutil and importlib.util.find_spec("psutil") is not None

    def linear_kernels(self) -> list[type[LinearKernel]]:
        """The CPU list with quantrt's native grouped-int kernel (csrc/int_gemm.cpp) ahead of torch's
        packed int4/int8 ops; it declines with the build's reason when the extension is unavailable."""
        kernels = super().linear_kernels()
        if self.name == "cpu":
            from quantrt.platforms.xpu.cpu_int_kernels import CpuInt4PackedKernel
            from quantrt.platforms.xpu.cpu_native_kernels import CpuNativeIntKernel

            at = kernels.index(CpuInt4PackedKernel) if CpuInt4PackedKernel in kernels else len(kernels)
            kernels.insert(at, CpuNativeIntKernel)
        return kernels

    def memory_info(self) -> tuple[int, int]:
        """(available, total) bytes of system memory."""
        if self._use_psutil:
            import psutil

            vm = psutil.virtual_memory()
            return int(vm.available), int(vm.total)
        fields: dict[str, int] = {}
        for line in self._meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key.strip()] = int(parts[0]) * 1024  # values are in kB
        total = fields["MemTotal"]
        return fields.get("MemAvailable", fields.get("MemFree", 0)), total

    def device_name(self) -> str:
        """The CPU model string ("model name" in /proc/cpuinfo), else what Python's platform says."""
        try:
            for line in self._cpuinfo.read_text(errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model Name", "cpu model", "Processor") and value.strip():
                    return value.strip()
        except OSError:
            pass
        return _pyplatform.processor() or _pyplatform.machine() or "cpu"

    def num_threads(self) -> int:
        """Threads torch uses for intra-op parallelism."""
        return torch.get_num_threads()

    def default_mem_fraction(self) -> float:
        return 0.5

    # paged decode attention over the pool in place (csrc/decode_ops.cpp); None (SDPA) without the extension
    decode_attention_ref: ClassVar[str | None] = "quantrt.platforms.xpu.cpu_layer_ops:cpu_decode_attention"

    def _native_layer_ops(self):
        """quantrt.platforms.xpu.cpu_layer_ops when this is the plain CPU platform and the extension loaded."""
        if self.name != "cpu":
            return None
        from quantrt.platforms.xpu import cpu_layer_ops

        return cpu_layer_ops if cpu_layer_ops.available() else None

    def rms_norm_op(self):
        """RMSNorm in one call: the native op (csrc/decode_ops.cpp) when the extension loaded, else the fused
        aten kernel (`torch.rms_norm`) instead of six element-wise ops; same semantics as layers/norm.py: fp32
        statistics, and for bf16/fp16 the normalized row is cast to the input dtype before the weight
        multiply (transformers' Llama order). Emulated platforms built on this class keep layers/norm.py's ops."""
        if self.name != "cpu":
            return None
        ops = self._native_layer_ops()
        return ops.cpu_rms_norm if ops is not None else _cpu_rms_norm

    def fused_add_rms_norm_op(self):
        """Residual add + RMSNorm in one native call (cpu_layer_ops.cpu_add_rms_norm), or None."""
        ops = self._native_layer_ops()
        return ops.cpu_add_rms_norm if ops is not None else None

    def rotary_kv_store_op(self):
        """Rotary on q/k + KV-pool write in one native call (cpu_layer_ops.cpu_rotary_kv_store), or None."""
        ops = self._native_layer_ops()
        return ops.cpu_rotary_kv_store if ops is not None else None

    def act_mul_op(self):
        """silu/gelu-tanh(gate) * up in one native call (cpu_layer_ops.cpu_act_mul), or None."""
        ops = self._native_layer_ops()
        return ops.cpu_act_mul if ops is not None else None

    def decode_stack_op(self, decoder):
        """Every layer of a plain decoder with cpu_native_int linears in one native call per decode step
        (cpu_decode_stack.CpuDecodeStack: it checks the model at its first step and declines with the reason)."""
        if self._native_layer_ops() is None:
            return None
        from quantrt.platforms.xpu.cpu_decode_stack import CpuDecodeStack

        return CpuDecodeStack(decoder)

    def describe(self) -> dict:
        """Platform.describe plus where the CPU layer ops come from (native, or torch and why)."""
        info = super().describe()
        if self.name == "cpu":
            from quantrt.platforms.xpu import cpu_layer_ops

            why = cpu_layer_ops.unavailable_reason()
            info["layer_ops"] = ("native (csrc/decode_ops.cpp: rms_norm, add_rms_norm, act_mul, rope_store_kv, "
                                 "decode_attention, decode_stack)" if why is None
                                 else f"torch (native ops unavailable: {why})")
            from quantrt.platforms.xpu import cpu_ext

            info["native_extension"] = cpu_ext.status()   # loaded (avx2+fma|scalar) or unavailable: why
            info["int_kernel"] = ("cpu_native_int (csrc/int_gemm.cpp: grouped int 2-8 bit, fp32 accumulation)"
                                  if cpu_ext.unavailable_reason() is None
                                  else "torch packed int4/int8 ops (cpu_native_int unavailable)")
        return info

    def tied_head_weight(self, embedding: torch.Tensor, compute_dtype: torch.dtype) -> QuantizedWeight | None:
        """The weight a tied LM head multiplies with, or None for the dense embedding itself.

        bf16/fp16 compute: symmetric per-row int8 (`quantize_int8_channel` of the fp32 embedding), so the
        head runs on the int8-pack op and streams half of bf16's bytes (SmolLM2's 49152x576 head is about
        half of a decode step's bytes). Measured on SmolLM2-135M Q4_1 over botchan.txt (512 tokens, vs the
        fp32 head): KL 0.0020 nats with it, 0.0005 with the dense bf16 head (docs/PERFORMANCE.md). fp32
        compute (the CPU default, bit-faithful to transformers) and `--enable-fp32-lm-head` keep the dense
        head.
        With the native extension loaded, an embedding holding exact Q8_0 values (GGUF Q8_0 token_embd) runs
        as those int8 32-blocks on `cpu_native_int` in every compute dtype instead: the file's own weights
        (no quality cost) at ~1/4 of the dense fp32 head's bytes.
        """
        if self.name != "cpu" or not embedding.dtype.is_floating_point:  # emulations keep their platform's head
            return None
        from quantrt.platforms.xpu import cpu_ext

        if cpu_ext.load():  # native kernel: the embedding's own Q8_0 blocks, exact (any compute dtype)
            from quantrt.platforms.xpu.cpu_native_kernels import q8_0_blocks_exact

            q8 = q8_0_blocks_exact(embedding)
            if q8 is not None:
                return q8
        if compute_dtype not in (torch.bfloat16, torch.float16):
            return None
        from quantrt.quant.formats.w8a8 import quantize_int8_channel

        return quantize_int8_channel(embedding)                   # codes [V, D] int8, scale [V, 1]


def _cpu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [..., D], weight: [D] in x.dtype -> [..., D] x.dtype
    if x.dtype == torch.float32:
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    return torch.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * weight
