"""Load a model for serving: config, tokenizer, quantization format, weights, in that order."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from quantrt.errors import CheckpointError, ConfigError
from quantrt.loader.weight_router import load_weights
from quantrt.models.registry import get_model_class

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: PretrainedConfig
    tokenizer: Any
    dtype: torch.dtype
    quant_method: str | None
    fmt: Any


def _config_dtype(config: PretrainedConfig) -> torch.dtype | None:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else None


def compute_dtype(args, config: PretrainedConfig, platform) -> torch.dtype:
    """--dtype resolved by SGLang's rule; on CPU `auto` means fp32 (fp16/bf16 matmuls are slow there
    without AVX512-FP16/BF16, and batch>1 decode is compute-bound)."""
    from quantrt.server_args import resolve_dtype

    if args.dtype == "auto" and platform.name == "cpu":
        return torch.float32
    dtype = resolve_dtype(args.dtype, _config_dtype(config), getattr(config, "model_type", ""))
    if dtype not in platform.supported_dtypes():
        raise ConfigError(f"--dtype {args.dtype} resolves to {dtype}, which {platform.name} does not support; "
                          f"supported: {', '.join(str(d) for d in platform.supported_dtypes())}")
    return dtype


def _open_checkpoint(args):
    """(config, tokenizer, tensor iterator factory, tensor count, quant config source path)."""
    from quantrt.loader.gguf_reader import GgufCheckpoint, find_gguf_file

    path = args.model_path
    if not os.path.exists(path):
        raise CheckpointError(f"--model-path {path} does not exist (quantrt cannot download from a hub: "
                              "pass a local directory or a .gguf file)")
    gguf = find_gguf_file(path) if args.load_format in ("auto", "gguf") else None
    if gguf is not None:
        ck = GgufCheckpoint(gguf)
        tok = AutoTokenizer.from_pretrained(args.tokenizer_path) if args.tokenizer_path else ck.tokenizer()
        return ck.hf_config(), tok, ck.iter_tensors, len(ck.tensor_names()), gguf
    if args.load_format == "gguf":
        raise CheckpointError(f"--load-format gguf but no .gguf file at {path}")
    from quantrt.loader.safetensors_source import open_source

    config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(args.tokenizer_path or path, trust_remote_code=args.trust_remote_code)
    src = open_source(path, "auto" if args.load_format == "bitsandbytes" else args.load_format)  # bnb: safetensors
    return config, tok, src.iter_tensors, len(src.names()), path


def load_model(args, platform, progress: bool = False) -> LoadedModel:
    from quantrt.platform.checks import check_method_allowed
    from quantrt.quant.detect import FLAG_METHODS, build_format, detect_for_args

    config, tokenizer, tensors, total, qpath = _open_checkpoint(args)
    model_cls = get_model_class(getattr(config, "architectures", None), getattr(config, "model_type", None))
    method, qcfg = detect_for_args(qpath, config.to_dict(), args)
    if method is not None and method not in FLAG_METHODS:
        check_method_allowed(platform, method)  # the checkpoint's method may differ from the flag
    fmt = build_format(method, qcfg, args)
    dtype = compute_dtype(args, config, platform)
    max_pos = args.context_length or getattr(config, "max_position_embeddings", 4096)
    model = model_cls(config, max_pos)
    model.fp32_lm_head = bool(args.enable_fp32_lm_head)
    if method == "gguf":  # linears keep their GGML blocks (quantrt.quant.formats.gguf); the rest dequantized
        from quantrt.quant.formats.gguf import native_tensors

        tensors = lambda ck=tensors.__self__: native_tensors(ck, model)  # noqa: E731
    norm_biases = fmt.norm_biases() if fmt is not None else frozenset()
    if norm_biases:  # msModelSlim anti-outlier: only the norms the description names get a bias
        if not hasattr(model, "enable_norm_biases"):
            raise CheckpointError(f"{type(model).__name__} has no RMSNorm bias support, but the checkpoint "
                                  f"declares {sorted(norm_biases)[0]}.bias")
        model.enable_norm_biases(norm_biases)
    load_weights(model, _skip_tied_head(tensors(), model), total, fmt, platform, dtype, progress)
    if fmt is not None:
        fmt.finish_loading()
    model.finish_loading(dtype, platform)
    model.eval()
    return LoadedModel(model, config, tokenizer, dtype, method, fmt)


def _skip_tied_head(tensors, model):
    skip = getattr(model, "skip_checkpoint_tensor", None)  # e.g. DeepSeek's multi-token-prediction layers
    for name, t in tensors:
        if name == "lm_head.weight" and model.lm_head is None:
            continue  # tied embeddings: some checkpoints still store the (identical) head
        if skip is not None and skip(name):
            continue
        yield name, t
