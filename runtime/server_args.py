"""`ServerArgs`: every flag, spelled like SGLang's, validated once.

Fields are snake_case (`kv_cache_dtype`); flags are `--kebab-case` (`--kv-cache-dtype`). Choice
lists live in `quantrt.choices`. Flags that are recognised but not built yet are refused by
`ServerArgs.check_supported()`, driven by the `NOT_SUPPORTED_YET` table: when a feature lands,
delete its row.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from quantrt.choices import (
    DTYPES,
    FP4_GEMM_BACKENDS,
    FP8_GEMM_BACKENDS,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    LOG_LEVELS,
    MODELOPT_QUANT_CHOICES,
    QUANTIZATION_CHOICES,
    TORCHAO_CHOICES,
)
from quantrt.errors import ConfigError, NotSupportedYet, choices_error


@dataclass(frozen=True)
class ServerArgs:
    """Every option of the runtime. Defaults follow SGLang 0.5.9 unless noted."""

    # Model and tokenizer
    model_path: str
    tokenizer_path: str | None = None          # None = model_path
    trust_remote_code: bool = False
    context_length: int | None = None          # None = from the model config
    download_dir: str | None = None
    load_format: str = "auto"
    # Precision and quantization
    dtype: str = "auto"
    quantization: str | None = None
    torchao_config: str | None = None
    kv_cache_dtype: str = "auto"
    fp8_gemm_backend: str = "auto"
    fp4_gemm_backend: str = "auto"             # SGLang 0.5.9 defaults to flashinfer_cutlass
    modelopt_quant: str | None = None
    modelopt_checkpoint_save_path: str | None = None
    modelopt_checkpoint_restore_path: str | None = None
    modelopt_export_path: str | None = None
    quantize_and_serve: bool = False
    quantization_config_path: str | None = None
    enable_fp32_lm_head: bool = False
    # Device and parallelism
    device: str | None = None                  # None = probe (or QUANTRT_PLATFORM)
    tp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    # Memory and scheduling
    mem_fraction_static: float | None = None   # None = platform default
    max_running_requests: int = 64
    max_total_tokens: int | None = None        # None = derive from memory
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int = 512            # -1 disables chunked prefill
    page_size: int = 16
    disable_cuda_graph: bool = False
    disable_overlap_schedule: bool = False     # queue greedy decode step N+1 before reading step N's tokens
    cuda_graph_max_bs: int | None = None       # None = min(max_running_requests, 256)
    random_seed: int | None = None
    # Server
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    skip_server_warmup: bool = False
    log_level: str = "info"
    served_model_name: str | None = None       # None = model_path (the OpenAI `model` name)
    max_queued_requests: int | None = None     # None = 256 in the server; over it: HTTP 503

    def __post_init__(self) -> None:
        self._normalize()
        self._check_types()
        self._check_choices()
        self._check_ranges()
        self._check_conflicts()
        self.check_supported()

    # ----------------------------------------------------------------- validation
    def _normalize(self) -> None:
        """Empty strings mean "not set" for the optional string flags (SGLang passes "" for some)."""
        for f in dataclasses.fields(self):
            if f.default is None and getattr(self, f.name) == "":
                object.__setattr__(self, f.name, None)

    def _check_types(self) -> None:
        if not isinstance(self.model_path, str) or not self.model_path:
            raise ConfigError("--model-path is required (a checkpoint directory or a .gguf file)")
        for name, kind in _FIELD_KINDS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            if not _is_kind(value, kind):
                raise ConfigError(f"{_flag(name)} expects {kind.__name__}, got {value!r}")

    def _check_choices(self) -> None:
        for name, options in _CHOICE_FIELDS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            if value not in options:
                raise choices_error(_flag(name), value, options)

    def _check_ranges(self) -> None:
        _at_least("tp_size", self.tp_size, 1)
        _at_least("nnodes", self.nnodes, 1)
        _at_least("node_rank", self.node_rank, 0)
        if self.node_rank >= self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} must be smaller than --nnodes {self.nnodes}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port} is out of range; use 1..65535")
        frac = self.mem_fraction_static
        if frac is not None and not 0.0 < frac < 1.0:
            raise ConfigError(f"--mem-fraction-static {frac} must be between 0 and 1 (exclusive)")
        for name in ("max_running_requests", "max_prefill_tokens", "page_size"):
            _at_least(name, getattr(self, name), 1)
        for name in ("context_length", "max_total_tokens", "cuda_graph_max_bs"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if self.chunked_prefill_size != -1:
            _at_least("chunked_prefill_size", self.chunked_prefill_size, 1, note=" (or -1 to disable)")
        if self.random_seed is not None:
            _at_least("random_seed", self.random_seed, 0)
        if self.max_queued_requests is not None:
            _at_least("max_queued_requests", self.max_queued_requests, 1)
        if not self.host:
            raise ConfigError("--host must not be empty")

    def _check_conflicts(self) -> None:
        if self.torchao_config is not None and self.quantization is not None:
            raise ConfigError(
                f"--torchao-config {self.torchao_config!r} and --quantization {self.quantization!r} "
                "cannot be used together; pick one"
            )
        gguf_file = is_gguf_path(self.model_path)
        for name in ("quantization", "load_format"):
            if getattr(self, name) == "gguf" and not gguf_file:
                raise ConfigError(
                    f"{_flag(name)} gguf needs --model-path to be a .gguf file, got {self.model_path!r}"
                )
        if gguf_file and self.load_format not in ("auto", "gguf"):
            raise ConfigError(
                f"--load-format {self.load_format!r} cannot read the .gguf file {self.model_path!r}; "
                "use --load-format auto or gguf"
            )
        if self.load_format == "bitsandbytes":  # SGLang's spelling: bnb checkpoint, or online bnb quantization
            other = [f"{_flag(n)} {getattr(self, n)}" for n in ("torchao_config", "quantization_config_path")
                     if getattr(self, n) is not None]
            if self.quantization not in (None, "bitsandbytes"):
                other.insert(0, f"--quantization {self.quantization}")
            if other:
                raise ConfigError(f"--load-format bitsandbytes loads a bitsandbytes checkpoint or quantizes with "
                                  f"bitsandbytes; it contradicts {' and '.join(other)} (drop one; "
                                  f"--quantization bitsandbytes is the only quantization it allows)")

    def check_supported(self) -> None:
        """Refuse recognised flags whose behaviour is not built yet (rows of `NOT_SUPPORTED_YET`)."""
        for row in NOT_SUPPORTED_YET:
            if row.applies(self):
                raise NotSupportedYet(row.message(self))

    # ----------------------------------------------------------------- construction
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every field name, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ServerArgs:
        """Build from keyword arguments (the Engine's path); an unknown key is a ConfigError."""
        known = set(cls.field_names())
        for key in kwargs:
            if key not in known:
                raise ConfigError(_unknown_key_message(key, cls.field_names()))
        if "model_path" not in kwargs:
            raise ConfigError("model_path is required (a checkpoint directory or a .gguf file)")
        return cls(**kwargs)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ServerArgs:
        """Build from a namespace filled by `add_cli_args` (extra attributes are ignored)."""
        values = vars(ns)
        kwargs = {name: values[name] for name in cls.field_names() if name in values}
        if kwargs.get("model_path") is None:
            raise ConfigError("--model-path is required (a checkpoint directory or a .gguf file)")
        return cls(**kwargs)

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> ServerArgs:
        """Parse SGLang-style flags (`--model-path … --quantization fp8`) into a ServerArgs."""
        parser = argparse.ArgumentParser(prog="quantrt", description="quantrt server arguments")
        cls.add_cli_args(parser)
        return cls.from_namespace(parser.parse_args(argv))

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add every ServerArgs flag, with SGLang's spelling, to `parser`."""
        _add_model_args(parser)
        _add_quant_args(parser)
        _add_device_args(parser)
        _add_memory_args(parser)
        _add_server_args(parser)

    def to_kwargs(self) -> dict[str, Any]:
        """The fields as a dict (round-trips through `from_kwargs`)."""
        return {name: getattr(self, name) for name in self.field_names()}


# --------------------------------------------------------------------- not supported yet
@dataclass(frozen=True)
class Unsupported:
    """One row of the not-supported-yet table: flag, when it applies, why/when it comes."""

    field: str
    applies: Callable[[ServerArgs], bool]
    detail: str = "it comes in a later issue"

    def message(self, args: ServerArgs) -> str:
        value = getattr(args, self.field)
        shown = _flag(self.field) if isinstance(value, bool) else f"{_flag(self.field)} {value!r}"
        return f"{shown} is not supported yet: {self.detail}"


SUPPORTED_QUANTIZATION: frozenset[str | None] = frozenset({None, "fp8", "gguf", "modelslim", "quark_int4fp8_moe", "w8a8_int8",
                                                          "awq", "awq_marlin", "gptq", "gptq_marlin", "marlin",
                                                          "w8a8_fp8", "compressed-tensors", "auto-round", "bitsandbytes",
                                                          "mxfp4", "modelopt", "modelopt_fp8", "modelopt_fp4",
                                                          "petit_nvfp4", "moe_wna16"})
SUPPORTED_LOAD_FORMATS: frozenset[str] = frozenset({"auto", "safetensors", "gguf", "bitsandbytes"})

NOT_SUPPORTED_YET: tuple[Unsupported, ...] = (
    Unsupported("tp_size", lambda a: a.tp_size > 1, "tensor parallelism comes in a later issue"),
    Unsupported("nnodes", lambda a: a.nnodes > 1, "multi-node serving comes in a later issue"),
    Unsupported("dist_init_addr", lambda a: a.dist_init_addr is not None,
                "multi-node serving comes in a later issue"),
    Unsupported("quantization", lambda a: a.quantization not in SUPPORTED_QUANTIZATION,
                "only fp8 (online or pre-quantized) and gguf checkpoints are built so far"),
    Unsupported("load_format", lambda a: a.load_format not in SUPPORTED_LOAD_FORMATS,
                "only auto, safetensors, gguf and bitsandbytes are built so far"),
    Unsupported("modelopt_quant", lambda a: a.modelopt_quant is not None,
                "ModelOpt online quantization comes in a later issue"),
    Unsupported("modelopt_checkpoint_save_path", lambda a: a.modelopt_checkpoint_save_path is not None,
                "ModelOpt online quantization comes in a later issue"),
    Unsupported("modelopt_checkpoint_restore_path",
                lambda a: a.modelopt_checkpoint_restore_path is not None,
                "ModelOpt online quantization comes in a later issue"),
    Unsupported("modelopt_export_path", lambda a: a.modelopt_export_path is not None,
                "ModelOpt online quantization comes in a later issue"),
    Unsupported("quantize_and_serve", lambda a: a.quantize_and_serve,
                "SGLang 0.5.9 itself raises NotImplementedError for it; quantize and export first, "
                "then serve the exported checkpoint"),
)


# --------------------------------------------------------------------- dtype
_DTYPE_BY_NAME: dict[str, torch.dtype] = {
    "half": torch.float16,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "float32": torch.float32,
}


def resolve_dtype(args_dtype: str, config_dtype: torch.dtype | str | None, model_type: str) -> torch.dtype:
    """The model dtype for `--dtype args_dtype` (SGLang 0.5.9 `_get_and_verify_dtype`, FORMATS.md §6).

    `auto`: an fp32 or missing config dtype becomes fp16, except Gemma models (`model_type`
    starting with "gemma"), which get bf16; any other config dtype is kept.
    """
    name = args_dtype.lower()
    if name != "auto":
        if name not in _DTYPE_BY_NAME:
            raise choices_error("--dtype", args_dtype, DTYPES)
        return _DTYPE_BY_NAME[name]
    if isinstance(config_dtype, str):
        config_dtype = _DTYPE_BY_NAME.get(config_dtype.removeprefix("torch."))
    if config_dtype is None or config_dtype == torch.float32:
        return torch.bfloat16 if (model_type or "").startswith("gemma") else torch.float16
    return config_dtype


def is_gguf_path(path: str | None) -> bool:
    """True when `path` names a GGUF file (SGLang turns quantization and load format to gguf)."""
    return bool(path) and str(path).lower().endswith(".gguf")


# --------------------------------------------------------------------- helpers
_CHOICE_FIELDS: dict[str, tuple[str, ...]] = {
    "dtype": DTYPES,
    "quantization": QUANTIZATION_CHOICES,
    "torchao_config": TORCHAO_CHOICES,
    "kv_cache_dtype": KV_CACHE_DTYPES,
    "fp8_gemm_backend": FP8_GEMM_BACKENDS,
    "fp4_gemm_backend": FP4_GEMM_BACKENDS,
    "modelopt_quant": MODELOPT_QUANT_CHOICES,
    "load_format": LOAD_FORMATS,
    "log_level": LOG_LEVELS,
}


def _field_kinds() -> tuple[dict[str, type], frozenset[str]]:
    """Map each field to its base type (str/int/float/bool) and list the Optional ones."""
    kinds: dict[str, type] = {}
    optional: set[str] = set()
    for f in dataclasses.fields(ServerArgs):
        ann = str(f.type)
        for kind in (bool, int, float, str):
            if ann.startswith(kind.__name__):
                kinds[f.name] = kind
                break
        if "None" in ann:
            optional.add(f.name)
    return kinds, frozenset(optional)


_FIELD_KINDS, _OPTIONAL_FIELDS = _field_kinds()


def _is_kind(value: object, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _flag(name: str) -> str:
    """`kv_cache_dtype` -> `--kv-cache-dtype`."""
    return "--" + name.replace("_", "-")


def _at_least(name: str, value: int, low: int, note: str = "") -> None:
    if value < low:
        raise ConfigError(f"{_flag(name)} must be >= {low}{note}, got {value}")


def _unknown_key_message(key: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    if close:
        return f"unknown ServerArgs field {key!r}; did you mean: {', '.join(close)}?"
    return f"unknown ServerArgs field {key!r}; known fields: {', '.join(sorted(names))}"


def _default(name: str) -> Any:
    return ServerArgs.__dataclass_fields__[name].default


def _opts(options: Sequence[str]) -> str:
    return ", ".join(options)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-path", "--model", dest="model_path", default=None,
                   help="Checkpoint directory (Hugging Face layout) or a .gguf file.")
    g.add_argument("--tokenizer-path", default=None, help="Tokenizer path (default: the model path).")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="Allow custom model code shipped with the checkpoint.")
    g.add_argument("--context-length", type=int, default=None,
                   help="Maximum context length (default: from the model's config.json).")
    g.add_argument("--download-dir", default=None, help="Model download directory for Hugging Face.")
    g.add_argument("--load-format", default=_default("load_format"), choices=LOAD_FORMATS,
                   help=f"Weight file format; one of: {_opts(LOAD_FORMATS)}.")
    g.add_argument("--dtype", default=_default("dtype"), choices=DTYPES,
                   help="Weight/activation dtype; auto = fp16 for fp32/fp16 models (bf16 for Gemma), "
                        "bf16 for bf16 models.")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--quantization", default=None, choices=QUANTIZATION_CHOICES,
                   help=f"Quantization method; one of: {_opts(QUANTIZATION_CHOICES)}.")
    g.add_argument("--torchao-config", default=None, choices=TORCHAO_CHOICES,
                   help=f"torchao online quantization; one of: {_opts(TORCHAO_CHOICES)}.")
    g.add_argument("--kv-cache-dtype", default=_default("kv_cache_dtype"), choices=KV_CACHE_DTYPES,
                   help="KV cache storage dtype; auto = the model dtype.")
    g.add_argument("--fp8-gemm-backend", default=_default("fp8_gemm_backend"), choices=FP8_GEMM_BACKENDS,
                   help="Runner for block-FP8 GEMMs; auto lets the platform pick.")
    g.add_argument("--fp4-gemm-backend", default=_default("fp4_gemm_backend"), choices=FP4_GEMM_BACKENDS,
                   help="Runner for NVFP4 GEMMs; auto lets the platform pick.")
    g.add_argument("--modelopt-quant", default=None, choices=MODELOPT_QUANT_CHOICES,
                   help="ModelOpt online quantization config.")
    g.add_argument("--modelopt-checkpoint-save-path", default=None,
                   help="Where to save the ModelOpt-quantized checkpoint.")
    g.add_argument("--modelopt-checkpoint-restore-path", default=None,
                   help="Restore a saved ModelOpt-quantized checkpoint instead of quantizing.")
    g.add_argument("--modelopt-export-path", default=None,
                   help="Export the ModelOpt-quantized model in Hugging Face format here.")
    g.add_argument("--quantize-and-serve", action="store_true",
                   help="Quantize with ModelOpt and serve without exporting.")
    g.add_argument("--quantization-config-path", default=None,
                   help="YAML file of per-layer quantization rules (sglang-jax style).")
    g.add_argument("--enable-fp32-lm-head", action="store_true",
                   help="Compute the LM head (logits) in fp32.")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device and parallelism")
    g.add_argument("--device", default=None,
                   help="Device: cuda, rocm, npu, xpu, cpu or a plugin platform (default: auto-detect).")
    g.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int,
                   default=_default("tp_size"), help="Tensor parallelism size.")
    g.add_argument("--nnodes", type=int, default=_default("nnodes"), help="Number of nodes.")
    g.add_argument("--node-rank", type=int, default=_default("node_rank"), help="This node's rank.")
    g.add_argument("--dist-init-addr", "--nccl-init-addr", dest="dist_init_addr", default=None,
                   help="host:port for initializing the distributed backend.")


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory and scheduling")
    g.add_argument("--mem-fraction-static", type=float, default=None,
                   help="Fraction of device memory for weights and KV cache (default: platform's).")
    g.add_argument("--max-running-requests", type=int, default=_default("max_running_requests"),
                   help="Maximum number of running requests.")
    g.add_argument("--max-total-tokens", type=int, default=None,
                   help="Tokens in the KV pool (default: derived from memory).")
    g.add_argument("--max-prefill-tokens", type=int, default=_default("max_prefill_tokens"),
                   help="Maximum tokens in one prefill batch.")
    g.add_argument("--chunked-prefill-size", type=int, default=_default("chunked_prefill_size"),
                   help="Tokens per prefill chunk; -1 disables chunked prefill.")
    g.add_argument("--page-size", type=int, default=_default("page_size"), help="Tokens per KV page.")
    g.add_argument("--disable-cuda-graph", action="store_true", help="Disable decode graphs (CUDA graphs).")
    g.add_argument("--disable-overlap-schedule", action="store_true",
                   help="Read each decode step's tokens before queuing the next (default: greedy decode steps "
                        "are queued one ahead on platforms with decode graphs).")
    g.add_argument("--cuda-graph-max-bs", type=int, default=None,
                   help="Largest decode batch run through a graph (default: max running requests, <= 256).")
    g.add_argument("--random-seed", type=int, default=None, help="The random seed.")


def _add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default=_default("host"), help="HTTP server host.")
    g.add_argument("--port", type=int, default=_default("port"), help="HTTP server port.")
    g.add_argument("--api-key", default=None, help="API key the server requires.")
    g.add_argument("--skip-server-warmup", action="store_true", help="Skip the warmup request.")
    g.add_argument("--log-level", default=_default("log_level"), choices=LOG_LEVELS,
                   help="Logging level.")
    g.add_argument("--served-model-name", default=None,
                   help="Model name the OpenAI API reports and accepts (default: the model path).")
    g.add_argument("--max-queued-requests", type=int, default=None,
                   help="Requests in flight before the server answers 503 (default: 256).")
