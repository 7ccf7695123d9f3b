"""Option lists for the command line, spelled exactly as SGLang 0.5.9 spells them.

This module is the single source of truth for every choice list. Each list is a `str` enum whose
members compare equal to, and print as, the CLI spelling (`str(Quantization.AUTO_ROUND) == "auto-round"`),
plus a tuple of the spellings (`QUANTIZATION_CHOICES`) for argparse and error messages.
Facts come from `sgl@0.5.9:srt/server_args.py` (see reference/FORMATS.md §0, §1.3, §4.2, §4.3, §6).
"""

from __future__ import annotations

from enum import Enum


class CliEnum(str, Enum):
    """A `str` enum whose members print as the CLI spells them."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """Every CLI spelling, in declaration order."""
        return tuple(m.value for m in cls)


class Quantization(CliEnum):
    """`--quantization`: SGLang 0.5.9's `QUANTIZATION_CHOICES` (23) plus `quark`.

    `quark` is a registered method in 0.5.9 but only became a CLI choice later; we accept it now.
    `blockwise_int8` and `fbgemm_fp8` are registered methods reached only through a checkpoint's
    config, never from the CLI, so they are not listed here.
    """

    AWQ = "awq"
    FP8 = "fp8"
    MXFP8 = "mxfp8"
    GPTQ = "gptq"
    MARLIN = "marlin"
    GPTQ_MARLIN = "gptq_marlin"
    AWQ_MARLIN = "awq_marlin"
    BITSANDBYTES = "bitsandbytes"
    GGUF = "gguf"
    MODELOPT = "modelopt"
    MODELOPT_FP8 = "modelopt_fp8"
    MODELOPT_FP4 = "modelopt_fp4"
    PETIT_NVFP4 = "petit_nvfp4"
    W8A8_INT8 = "w8a8_int8"
    W8A8_FP8 = "w8a8_fp8"
    MOE_WNA16 = "moe_wna16"
    QOQ = "qoq"
    W4AFP8 = "w4afp8"
    MXFP4 = "mxfp4"
    AUTO_ROUND = "auto-round"
    COMPRESSED_TENSORS = "compressed-tensors"
    MODELSLIM = "modelslim"
    QUARK_INT4FP8_MOE = "quark_int4fp8_moe"
    QUARK = "quark"


class TorchaoConfig(CliEnum):
    """`--torchao-config` (SGLang 0.5.9 `torchao_utils.py`; int4wo group sizes 32/64/128/256)."""

    INT8DQ = "int8dq"
    INT8WO = "int8wo"
    FP8WO = "fp8wo"
    FP8DQ_PER_TENSOR = "fp8dq-per_tensor"
    FP8DQ_PER_ROW = "fp8dq-per_row"
    INT4WO_32 = "int4wo-32"
    INT4WO_64 = "int4wo-64"
    INT4WO_128 = "int4wo-128"
    INT4WO_256 = "int4wo-256"


class KvCacheDtype(CliEnum):
    """`--kv-cache-dtype` (SGLang 0.5.9; `fp4_e2m1` is renamed `fp4_mx_block16` in 0.5.23)."""

    AUTO = "auto"
    FP8_E5M2 = "fp8_e5m2"
    FP8_E4M3 = "fp8_e4m3"
    BF16 = "bf16"
    BFLOAT16 = "bfloat16"
    FP4_E2M1 = "fp4_e2m1"


class Dtype(CliEnum):
    """`--dtype` (weights and activations; `auto` is resolved from the model config)."""

    AUTO = "auto"
    HALF = "half"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT = "float"
    FLOAT32 = "float32"


class Fp8GemmBackend(CliEnum):
    """`--fp8-gemm-backend` (block-FP8 linear runner, SGLang 0.5.9, FORMATS.md §4.2)."""

    AUTO = "auto"
    DEEP_GEMM = "deep_gemm"
    FLASHINFER_TRTLLM = "flashinfer_trtllm"
    FLASHINFER_DEEPGEMM = "flashinfer_deepgemm"
    CUTLASS = "cutlass"
    TRITON = "triton"
    AITER = "aiter"


class Fp4GemmBackend(CliEnum):
    """`--fp4-gemm-backend` (NVFP4 linear runner, SGLang 0.5.9, FORMATS.md §4.2).

    SGLang's default is `flashinfer_cutlass`; ours is `auto` (the platform picks).
    """

    AUTO = "auto"
    FLASHINFER_CUDNN = "flashinfer_cudnn"
    FLASHINFER_CUTLASS = "flashinfer_cutlass"
    FLASHINFER_TRTLLM = "flashinfer_trtllm"


class ModeloptQuant(CliEnum):
    """`--modelopt-quant` (online quantization through NVIDIA Model Optimizer)."""

    FP8 = "fp8"
    INT4_AWQ = "int4_awq"
    W4A8_AWQ = "w4a8_awq"
    NVFP4 = "nvfp4"
    NVFP4_AWQ = "nvfp4_awq"


class LoadFormat(CliEnum):
    """`--load-format`: SGLang 0.5.9's `LOAD_FORMAT_CHOICES`."""

    AUTO = "auto"
    PT = "pt"
    SAFETENSORS = "safetensors"
    NPCACHE = "npcache"
    DUMMY = "dummy"
    SHARDED_STATE = "sharded_state"
    GGUF = "gguf"
    BITSANDBYTES = "bitsandbytes"
    LAYERED = "layered"
    FLASH_RL = "flash_rl"
    REMOTE = "remote"
    REMOTE_INSTANCE = "remote_instance"
    FASTSAFETENSORS = "fastsafetensors"
    PRIVATE = "private"


class Device(CliEnum):
    """Built-in `--device` names. Out-of-tree platform plugins add more; the platform layer
    (`quantrt.platform.resolve_platform`) validates the name, so `--device` takes any string."""

    CUDA = "cuda"
    ROCM = "rocm"
    NPU = "npu"
    XPU = "xpu"
    CPU = "cpu"


class LogLevel(CliEnum):
    """`--log-level` (Python logging level names, lower case)."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


QUANTIZATION_CHOICES: tuple[str, ...] = Quantization.values()
TORCHAO_CHOICES: tuple[str, ...] = TorchaoConfig.values()
KV_CACHE_DTYPES: tuple[str, ...] = KvCacheDtype.values()
DTYPES: tuple[str, ...] = Dtype.values()
FP8_GEMM_BACKENDS: tuple[str, ...] = Fp8GemmBackend.values()
FP4_GEMM_BACKENDS: tuple[str, ...] = Fp4GemmBackend.values()
MODELOPT_QUANT_CHOICES: tuple[str, ...] = ModeloptQuant.values()
LOAD_FORMATS: tuple[str, ...] = LoadFormat.values()
DEVICES: tuple[str, ...] = Device.values()
LOG_LEVELS: tuple[str, ...] = LogLevel.values()
