"""Which quantization method a checkpoint plus `--quantization` select (FORMATS.md §1.3, SGLang 0.5.9).

Steps: (1) a `*.gguf` model path is gguf; (2) find the checkpoint's quant config in the first source
that has one (`CHECKPOINT_SOURCES`; `PRECEDENCE_SOURCES` win over them, for msModelSlim later);
(3) method = its `quant_method`; (4) override hooks (`OVERRIDES`) may rename it; (5) reconcile with the
CLI value (`ALLOWED_CLI_OVERRIDES`, else SGLang's mismatch error). `build_format` then turns the method
into a QuantFormat, or says the method is recognised but not built yet.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantrt.choices import QUANTIZATION_CHOICES
from quantrt.errors import ConfigError, NotSupportedYet, choices_error

if TYPE_CHECKING:
    from quantrt.quant.format import QuantFormat
    from quantrt.server_args import ServerArgs

# Every method name we recognise: the CLI choices (quantrt.choices, SGLang 0.5.9 spellings) plus the
# methods SGLang registers that only a checkpoint config can select.
CHECKPOINT_ONLY_METHODS: tuple[str, ...] = ("blockwise_int8", "fbgemm_fp8")
KNOWN_METHODS: tuple[str, ...] = QUANTIZATION_CHOICES + CHECKPOINT_ONLY_METHODS
# Methods that quantize a float checkpoint at load time (valid on an unquantized checkpoint).
ONLINE_METHODS = frozenset({"bitsandbytes", "fp8", "mxfp4", "mxfp8", "quark_int4fp8_moe", "w8a8_int8", "w8a8_fp8"})
# (cli, checkpoint) pairs where the CLI value wins (FORMATS.md §1.3 step 5).
ALLOWED_CLI_OVERRIDES = frozenset({
    ("modelopt_fp8", "modelopt"), ("modelopt_fp4", "modelopt"), ("petit_nvfp4", "modelopt"),
    ("w8a8_int8", "compressed-tensors"), ("w8a8_fp8", "compressed-tensors"),
})

QuantConfig = dict[str, Any]
# A source: (model path or None, config.json dict) -> (quant config, where it was found) or None.
QuantSource = Callable[[Path | None, dict[str, Any]], "tuple[QuantConfig, str] | None"]
# An override hook: (checkpoint method, quant config, cli method) -> new method name or None.
Override = Callable[[str, QuantConfig, "str | None"], "str | None"]


def _modelopt_algo_method(algo: str) -> str | None:
    """ModelOpt `quant_algo` -> method (flat configs and hf_quant_config.json)."""
    a = algo.upper()
    if a == "MIXED_PRECISION":
        return "w4afp8"
    if "FP4" in a:
        return "modelopt_fp4"
    if "FP8" in a:
        return "modelopt_fp8"
    return None


def _from_hf_quantization_config(_path: Path | None, hf: dict[str, Any]) -> tuple[QuantConfig, str] | None:
    """config.json `quantization_config` (or `text_config.quantization_config`, multimodal models)."""
    candidates = [("config.json quantization_config", hf.get("quantization_config"))]
    text = hf.get("text_config")
    if isinstance(text, dict):
        candidates.append(("config.json text_config.quantization_config", text.get("quantization_config")))
    for where, cfg in candidates:
        if isinstance(cfg, dict) and cfg:
            cfg = dict(cfg)
            if "quant_method" not in cfg and "quant_algo" in cfg:  # flat ModelOpt config
                method = _modelopt_algo_method(str(cfg["quant_algo"]))
                if method is not None:
                    cfg["quant_method"] = method
            return cfg, where
    return None


def _from_compression_config(_path: Path | None, hf: dict[str, Any]) -> tuple[QuantConfig, str] | None:
    """Legacy compressed-tensors key."""
    cfg = hf.get("compression_config")
    if isinstance(cfg, dict) and cfg:
        cfg = dict(cfg)
        cfg.setdefault("quant_method", "compressed-tensors")
        return cfg, "config.json compression_config"
    return None


def _from_hf_quant_config_json(path: Path | None, _hf: dict[str, Any]) -> tuple[QuantConfig, str] | None:
    """ModelOpt `hf_quant_config.json` beside config.json: `quantization.quant_algo` mapped to a method;
    like SGLang the result is only {"quant_method": ...} (plus the algo, for the modelopt override)."""
    if path is None or not path.is_dir() or not (path / "hf_quant_config.json").is_file():
        return None
    import json

    f = path / "hf_quant_config.json"
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{f} is not valid JSON ({e})") from None
    algo = (doc.get("quantization") or {}).get("quant_algo") if isinstance(doc, dict) else None
    method = _modelopt_algo_method(str(algo)) if algo else None
    if method is None:
        raise ConfigError(f"{f}: quantization.quant_algo {algo!r} is not a ModelOpt algorithm quantrt knows "
                          f"(FP8, NVFP4/FP4, MIXED_PRECISION)")
    return {"quant_method": method, "quant_algo": str(algo)}, "hf_quant_config.json"


# First match wins.
CHECKPOINT_SOURCES: list[QuantSource] = [_from_hf_quantization_config, _from_compression_config,
                                         _from_hf_quant_config_json]
def _from_modelslim_description(path: Path | None, hf: dict[str, Any]) -> tuple[QuantConfig, str] | None:
    """msModelSlim `quant_model_description.json` (FORMATS.md §1.3 step 2.4: wins over config.json)."""
    from quantrt.quant.formats.modelslim import find_modelslim_config

    return find_modelslim_config(path, hf)


# Checked before CHECKPOINT_SOURCES and win over them.
PRECEDENCE_SOURCES: list[QuantSource] = [_from_modelslim_description]


def _modelopt_override(method: str, qcfg: QuantConfig, cli: str | None) -> str | None:
    """Checkpoint modelopt_fp8/fp4 always wins (but `--quantization petit_nvfp4` on an NVFP4 checkpoint picks
    petit, SGLang's ROCm path); `--quantization modelopt` or a `modelopt` checkpoint resolves by quant_algo."""
    algo = _modelopt_algo_method(str(qcfg.get("quant_algo", "")))
    if cli == "petit_nvfp4" and (method == "modelopt_fp4" or (method == "modelopt" and algo == "modelopt_fp4")):
        return "petit_nvfp4"
    if method in ("modelopt_fp8", "modelopt_fp4"):
        return method
    if cli == "modelopt" or (method == "modelopt" and cli is None):
        return _modelopt_algo_method(str(qcfg.get("quant_algo", "")))
    return None


MARLIN_GROUPS = (-1, 32, 64, 128)


def _marlin_platform(platform: Any = None) -> bool:
    """True on CUDA with SM >= 80 (where SGLang's Marlin kernels run). Asks the platform, never the device."""
    if platform is None:
        try:
            from quantrt.platform import current_platform

            platform = current_platform()
        except Exception:  # noqa: BLE001  (no platform resolvable: no override)
            return False
    if getattr(platform, "name", None) != "cuda":
        return False
    cap = platform.capability()
    return cap is None or cap.to_int() >= 80


def _awq_marlin_override(method: str, qcfg: QuantConfig, cli: str | None, platform: Any = None) -> str | None:
    """awq -> awq_marlin on CUDA for 4-bit checkpoints with zero points and Marlin group sizes, unless the
    CLI asks for plain `awq` (FORMATS.md §1.3 override table)."""
    if method != "awq" or cli not in (None, "marlin", "awq_marlin"):
        return None
    if not all(k in qcfg for k in ("bits", "group_size", "zero_point")):
        return None
    if qcfg["bits"] != 4 or not qcfg["zero_point"] or qcfg["group_size"] not in MARLIN_GROUPS:
        return None
    return "awq_marlin" if _marlin_platform(platform) else None


def _gptq_marlin_override(method: str, qcfg: QuantConfig, cli: str | None, platform: Any = None) -> str | None:
    """gptq -> gptq_marlin on CUDA for symmetric 4/8-bit checkpoints not already in Marlin format;
    an explicit `--quantization gptq` keeps gptq; asymmetric GPTQ never converts."""
    if method != "gptq" or cli not in (None, "marlin", "gptq_marlin"):
        return None
    if qcfg.get("checkpoint_format") == "marlin" or qcfg.get("is_marlin_format"):
        return None
    if (qcfg.get("bits"), qcfg.get("sym")) not in ((4, True), (8, True)):
        return None
    if qcfg.get("group_size", -1) not in MARLIN_GROUPS:
        return None
    return "gptq_marlin" if _marlin_platform(platform) else None


def _moe_wna16_override(method: str, qcfg: QuantConfig, cli: str | None) -> str | None:
    """`--quantization moe_wna16` on a gptq (bits 4/8, no desc_act) or awq (4-bit) checkpoint -> moe_wna16
    (SGLang's MoeWNA16Config: the MoE experts run the wna16 path, other layers stay gptq/awq); any other
    checkpoint is a clear error naming what moe_wna16 accepts."""
    if cli != "moe_wna16":
        return None
    bits = qcfg.get("bits", qcfg.get("w_bit"))
    if method == "gptq" and bits in (4, 8) and not qcfg.get("desc_act", False):
        return "moe_wna16"
    if method == "awq" and bits == 4:
        return "moe_wna16"
    why = (f"it is quantized with {method}" if method not in ("gptq", "awq") else
           f"its {method} config has bits={bits}" + (", desc_act=true" if qcfg.get("desc_act") else ""))
    raise ConfigError(f"--quantization moe_wna16 applies to GPTQ (bits 4 or 8, desc_act false) or AWQ (4-bit) "
                      f"checkpoints, but {why}; drop --quantization or pass --quantization {method}")


OVERRIDES: list[Override] = [_modelopt_override, _awq_marlin_override, _gptq_marlin_override, _moe_wna16_override]


def find_checkpoint_quant_config(model_path: str, hf_config: dict[str, Any]) -> tuple[QuantConfig, str] | None:
    """(quant config, where) from the first source that has one, or None for a float checkpoint."""
    p = Path(model_path) if model_path else None
    for source in PRECEDENCE_SOURCES + CHECKPOINT_SOURCES:
        found = source(p, hf_config or {})
        if found is not None:
            return found
    return None


def mismatch_error(ckpt_method: str, cli_method: str) -> ConfigError:
    """SGLang's wording for a checkpoint/CLI disagreement."""
    return ConfigError(f"Quantization method specified in the model config ({ckpt_method}) does not match "
                       f"the quantization method specified in the `quantization` argument ({cli_method}).")


def detect_quantization(model_dir_or_file: str, hf_config: dict[str, Any],
                        cli_method: str | None) -> tuple[str | None, QuantConfig]:
    """(method or None for unquantized, quant config: {} for online methods and gguf)."""
    cli = cli_method.lower() if cli_method else None
    if cli is not None and cli not in QUANTIZATION_CHOICES:
        raise choices_error("--quantization", cli_method, QUANTIZATION_CHOICES)
    if str(model_dir_or_file).endswith(".gguf"):
        if cli not in (None, "gguf"):
            raise mismatch_error("gguf", cli)
        return "gguf", {}
    found = find_checkpoint_quant_config(model_dir_or_file, hf_config)
    if found is None:
        if cli is None:
            return None, {}
        if cli in ONLINE_METHODS:
            return cli, {}
        if cli == "moe_wna16":
            raise ConfigError(f"--quantization moe_wna16 applies to GPTQ (bits 4 or 8) or AWQ (4-bit) checkpoints, "
                              f"but {model_dir_or_file} has no quantization config (config.json "
                              f"quantization_config); it does not quantize float checkpoints")
        raise ConfigError(f"--quantization {cli} needs a checkpoint quantized with {cli}, but "
                          f"{model_dir_or_file} has no quantization config (config.json quantization_config); "
                          f"online quantization of a float checkpoint supports: {', '.join(sorted(ONLINE_METHODS))}")
    qcfg, where = found
    method = str(qcfg.get("quant_method", "")).lower()
    if not method:
        raise ConfigError(f"{where} in {model_dir_or_file} has no quant_method")
    for hook in OVERRIDES:
        new = hook(method, qcfg, cli)
        if new is not None:
            method = cli = new
            break
    if cli is None or cli == method:
        return method, qcfg
    if (cli, method) in ALLOWED_CLI_OVERRIDES:
        return cli, qcfg
    if cli in ONLINE_METHODS:
        raise ConfigError(f"{mismatch_error(method, cli)} --quantization {cli} quantizes a float checkpoint "
                          f"at load time, but this checkpoint is already quantized with {method} ({where}); "
                          f"drop --quantization or pass --quantization {method}.")
    raise mismatch_error(method, cli)


# Methods that load without a registered format (GGUF now has one: quantrt.quant.formats.gguf).
LOADER_METHODS: tuple[str, ...] = ()


def built_methods() -> list[str]:
    """Quantization methods quantrt can load today."""
    from quantrt.quant.format import registered_formats

    return sorted(set(registered_formats()) | set(LOADER_METHODS))


def build_format(method: str | None, qcfg: QuantConfig, args: ServerArgs | None = None) -> QuantFormat | None:
    """The format object for `method` (None for an unquantized model)."""
    if method is None:
        return None
    from quantrt.quant.format import get_format, registered_formats

    supported = registered_formats()
    if method == "moe_wna16":  # the checkpoint's own gptq/awq format; its experts run the wna16 MoE kernels
        return get_format(str(qcfg["quant_method"]).lower()).from_config(qcfg, args)
    if method in supported:
        return get_format(method).from_config(qcfg, args)
    if method in KNOWN_METHODS:
        raise NotSupportedYet(f"quantization method {method!r} is recognised but not supported yet "
                              f"(supported: {', '.join(supported)})")
    raise choices_error("quantization method", method, KNOWN_METHODS)


# Online methods selected by their own flags rather than --quantization (not in KNOWN_METHODS).
FLAG_METHODS: dict[str, str] = {"torchao": "--torchao-config", "yaml_rules": "--quantization-config-path"}


def detect_for_args(model_dir_or_file: str, hf_config: dict[str, Any], args: Any) -> tuple[str | None, QuantConfig]:
    """detect_quantization plus the flag-selected online methods: `--torchao-config S` -> ("torchao",
    {"torchao_config": S}); `--quantization-config-path P` -> ("yaml_rules", {"path": P}). Both quantize
    float checkpoints only; on a quantized checkpoint the error names the flag and the checkpoint's method."""
    torchao = getattr(args, "torchao_config", None)
    rules = getattr(args, "quantization_config_path", None)
    cli = getattr(args, "quantization", None)
    if getattr(args, "load_format", None) == "bitsandbytes":  # = --quantization bitsandbytes (ServerArgs checks)
        found = find_checkpoint_quant_config(model_dir_or_file, hf_config)
        method = str(found[0].get("quant_method", "?")).lower() if found is not None else None
        if method not in (None, "bitsandbytes"):
            raise ConfigError(f"--load-format bitsandbytes reads bitsandbytes checkpoints (or quantizes float ones "
                              f"with bitsandbytes), but {model_dir_or_file} is quantized with {method} "
                              f"({found[1]}); drop --load-format bitsandbytes")
        cli = cli or "bitsandbytes"
    chosen = [(f"--torchao-config {torchao}", "torchao", {"torchao_config": torchao})] if torchao else []
    if rules:
        chosen.append((f"--quantization-config-path {rules}", "yaml_rules", {"path": rules}))
    if not chosen:
        return detect_quantization(model_dir_or_file, hf_config, cli)
    if len(chosen) > 1 or cli:
        flags = [c[0] for c in chosen] + ([f"--quantization {cli}"] if cli else [])
        raise ConfigError(f"{' and '.join(flags)} both choose the quantization; pass only one")
    flag, method, qcfg = chosen[0]
    if str(model_dir_or_file).endswith(".gguf"):
        raise ConfigError(f"{flag} quantizes a float checkpoint at load time, but {model_dir_or_file} is a "
                          f"GGUF file (already quantized with gguf)")
    found = find_checkpoint_quant_config(model_dir_or_file, hf_config)
    if found is not None:
        ckpt, where = found
        raise ConfigError(f"{flag} quantizes a float checkpoint at load time, but {model_dir_or_file} is already "
                          f"quantized with {str(ckpt.get('quant_method', '?')).lower()} ({where}); drop {flag.split()[0]}")
    return method, qcfg
