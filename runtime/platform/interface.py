"""The Platform interface: everything the runtime may ask about the device it runs on.

The runtime never touches a device runtime or a vendor SDK directly; it asks the active Platform.
Each device package (quantrt.platforms.<name>) subclasses Platform. Keep it small: device, count, memory, capability,
synchronize, dist backend, dtypes, kernels, attention backends, graph runner, config checks.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from quantrt.quant.kernel import LinearKernel
    from quantrt.quant.moe_kernel import MoEKernel
    from quantrt.server_args import ServerArgs


@dataclass(frozen=True)
class DeviceCapability:
    """Compute capability as major.minor (CUDA SM, ROCm gfx major.minor, None elsewhere)."""

    major: int
    minor: int

    def to_int(self) -> int:
        return self.major * 10 + self.minor

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


@dataclass(frozen=True)
class DecodeInputs:
    """One decode step on the host, as the model runner hands it to a graph runner.
    ids, positions, out_slots (KV slot of the new token), kv_lens: [B] int64; kv_slots: [B, L] int64
    (columns past kv_lens[i] are ignored)."""

    ids: torch.Tensor
    positions: torch.Tensor
    out_slots: torch.Tensor
    kv_lens: torch.Tensor
    kv_slots: torch.Tensor

    @property
    def batch(self) -> int:
        return int(self.ids.shape[0])


class Platform:
    """Base class. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str] = "base"  # cuda | rocm | npu | xpu | cpu | <plugin>
    device_type: ClassVar[str] = "cpu"  # torch device type
    dist_backend: ClassVar[str] = "gloo"  # nccl | hccl | xccl | gloo
    # Quantization methods this platform allows; None = every registered method.
    allowed_quantization: ClassVar[frozenset[str] | None] = None
    # "module:ATTR" of this platform's ordered linear kernels; a module not written yet means none.
    linear_kernels_ref: ClassVar[str | None] = None
    # "module:ATTR" of this platform's ordered MoE kernels (quantrt.quant.moe_kernel.MoEKernel subclasses).
    moe_kernels_ref: ClassVar[str | None] = None
    # "module:ATTR" of a paged decode attention callable (layer, q [B, H, D], fb, sinks) -> [B, H*D] or None
    # (None: not served, PagedAttention runs SDPA); used by quantrt.layers.attention on device tensors.
    decode_attention_ref: ClassVar[str | None] = None
    # "module:ATTR" of an extend (prefill) attention callable, same contract with q [T, H, D] -> [T, H*D] or None.
    # The callable's `runs_on_cpu` attribute (decode too) lets emulated vendor ops run on CPU tensors.
    extend_attention_ref: ClassVar[str | None] = None

    @property
    def is_cpu(self) -> bool:
        return self.device_type == "cpu"

    def device(self, index: int = 0) -> torch.device:
        return torch.device(self.device_type, index) if self.device_type != "cpu" else torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        raise NotImplementedError

    def capability(self) -> DeviceCapability | None:
        return None

    def device_name(self) -> str:
        return self.name

    def synchronize(self) -> None:
        return None

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    def fp8_dtype(self) -> torch.dtype:
        """The fp8 e4m3 flavour this device computes in (ROCm MI300 uses e4m3fnuz)."""
        return torch.float8_e4m3fn

    def default_mem_fraction(self) -> float:
        """Default --mem-fraction-static: share of device memory for weights + KV cache."""
        return 0.85

    def linear_kernels(self) -> list[type[LinearKernel]]:
        """Linear kernels in preference order (the portable reference kernel is always appended)."""
        if self.linear_kernels_ref is None:
            return []
        module, _, attr = self.linear_kernels_ref.partition(":")
        if importlib.util.find_spec(module) is None:
            return []
        return list(getattr(importlib.import_module(module), attr))

    def moe_kernels(self) -> list[type[MoEKernel]]:
        """MoE kernels in preference order (portable `grouped` for dense and `reference` are always appended)."""
        if self.moe_kernels_ref is None:
            return []
        module, _, attr = self.moe_kernels_ref.partition(":")
        if importlib.util.find_spec(module) is None:
            return []
        return list(getattr(importlib.import_module(module), attr))

    # Layer ops a platform may swap in for quantrt's own math (aiter on ROCm); None = ours. Each is a
    # callable; the layers fall back to their own math for cases an op does not cover (see each layer).
    def rms_norm_op(self) -> Any | None:
        """(x [..., D], weight [D] in x.dtype, eps) -> [..., D] x.dtype = x / rms(x) * weight (RMSNorm)."""
        return None

    def rotary_op(self) -> Any | None:
        """(q [T, H, D], k [T, Hkv, D], cos [P, D/2], sin [P, D/2], positions [T]) -> (q, k) rotated
        neox-style (rotate halves) at `positions` (RotaryEmbedding)."""
        return None

    def fused_add_rms_norm_op(self) -> Any | None:
        """(x [T, D], delta [T, D], weight [D] in x.dtype, eps) -> (y, s): s = x + delta in x.dtype (the new
        residual) and y = rms_norm_op's norm of s, in one step (RMSNorm.add_forward)."""
        return None

    def rotary_kv_store_op(self) -> Any | None:
        """(q [T, H, D], k [T, Hkv, D], v [T, Hkv, D], cos [P, D/2], sin [P, D/2], positions [T], pool, layer,
        slots [T], k_scale, v_scale) -> q rotated neox-style [T, H, D], with k rotated and k, v written into
        the KV pool at `slots`; or None (nothing written) where it does not serve (PagedAttention.rotary_forward)."""
        return None

    def decode_rotary_attention_op(self) -> Any | None:
        """(layer, q [B, H, D], k [B, Hkv, D], v, cos [P, D/2], sin, fb, sinks) -> [B, H*D]: a decode step's
        rotary_kv_store_op and decode attention in one step (k, v written at fb.out_slots); None from the call,
        with nothing written, where it does not serve (PagedAttention.rotary_forward then runs them apart). The op may
        carry `small_grid(layer, fb, rows) -> bool`: whether the q/k/v kernel before it may release it at its start
        this step (`PagedAttention.small_decode`, `QuantLinear.release_next`)."""
        return None

    def act_mul_op(self) -> Any | None:
        """(gu [T, 2I], gelu_tanh: bool) -> act(gu[:, :I]) * gu[:, I:] [T, I], act silu or gelu-tanh (gated MLP)."""
        return None

    def fused_add_rms_norm_codes_op(self) -> Any | None:
        """fused_add_rms_norm_op that also takes `codes` (a RowCodes) and then returns y as the activation codes
        the next linear asked for (QuantizedRows: LinearKernel.row_codes), saving that linear its quantize launch,
        or y itself where it does not serve (a row too wide); None: the norm returns y and the linear quantizes."""
        return None

    def act_mul_codes_op(self) -> Any | None:
        """act_mul_op that also takes `codes` (a RowCodes) and then returns its result as QuantizedRows, or the
        result itself where it does not serve (a row too wide); None: the linear always quantizes."""
        return None

    def decode_stack_op(self, decoder: Any) -> Any | None:
        """A callable (x [B, hidden] embedding rows, fb) -> the final norm's output [B, hidden], or None to let
        the layers run, that computes every layer of `decoder` (a DecoderModel) for a decode batch in one call
        (CPU: quantrt.platforms.xpu.cpu_decode_stack); None = the layers always run one by one."""
        return None

    def topk_op(self) -> Any | None:
        """(logits [T, E], RoutingConfig, correction_bias [E] | None) -> (weights [T, k] fp32, ids [T, k]
        int64) with quantrt.layers.moe.routing.select_experts' semantics (MoE routing)."""
        return None

    def attention_backends(self) -> list[str]:
        return ["torch_sdpa"]

    def graph_runner(self) -> Any | None:
        """A decode graph runner factory (CUDA graphs) or None. Called by the model runner as
        `factory(forward, device, max_bs, max_len)`; the runner's `run(DecodeInputs)` returns logits
        [B, V] or None (then the step runs eagerly); `sizes`, `max_len` and `disabled` describe it."""
        return None

    def check_config(self, args: ServerArgs) -> None:
        """Raise PlatformError/ConfigError when args ask for something this platform cannot do."""
        from quantrt.platform.checks import check_quantization_allowed

        check_quantization_allowed(self, args)
        self.check_gemm_backends(args)

    def check_gemm_backends(self, args: ServerArgs) -> None:
        """`--fp8-gemm-backend` / `--fp4-gemm-backend`: GPU libraries; only `auto` applies elsewhere."""
        from quantrt.errors import ConfigError

        for flag in ("fp8_gemm_backend", "fp4_gemm_backend"):
            value = getattr(args, flag, "auto")
            if value != "auto":
                raise ConfigError(f"--{flag.replace('_', '-')} {value} selects a CUDA/ROCm GEMM library; "
                                  f"on {self.name} only auto applies")

    def describe(self) -> dict[str, Any]:
        """What `quantrt env` prints for this platform."""
        cap = self.capability()
        free, total = self.memory_info()
        return {
            "platform": self.name,
            "device": self.device_name(),
            "device_count": self.device_count(),
            "capability": str(cap) if cap else None,
            "memory_free_gib": round(free / 2**30, 2),
            "memory_total_gib": round(total / 2**30, 2),
            "dist_backend": self.dist_backend,
            "dtypes": [str(d).removeprefix("torch.") for d in self.supported_dtypes()],
            "linear_kernels": [k.name for k in self.linear_kernels()] + ["reference"],
            "moe_kernels": [k.name for k in self.moe_kernels()] + ["grouped", "reference"],
            "attention_backends": self.attention_backends(),
            "graph_runner": self.graph_runner() is not None,
        }


FUSED_LAYER_HOOKS = ("fused_add_rms_norm_op", "rotary_kv_store_op", "act_mul_op", "decode_stack_op",
                     "fused_add_rms_norm_codes_op", "act_mul_codes_op", "decode_rotary_attention_op")


def without_fused_layer_ops(base: type[Platform]) -> type[Platform]:
    """`base` offering none of the fused per-layer hooks (FUSED_LAYER_HOOKS), so the layers run their own torch
    math: the unfused side of parity tests and benchmarks."""
    def none(self: Platform, *args: Any) -> None:
        return None

    return type(f"Unfused{base.__name__}", (base,), {hook: none for hook in FUSED_LAYER_HOOKS})
