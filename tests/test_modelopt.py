"""ModelOpt checkpoints (FORMATS.md §2.6): NVFP4 (`modelopt_fp4`) and FP8 (`modelopt_fp8`) on the reference path
everywhere, and NVFP4 through the Petit adapter (`petit_nvfp4`) on the emulated MI300 (EMULATED: no AMD GPU
or petit_kernel here). Checkpoints are written here from the documented layout; every check is against a
float64 dequantization of the written bytes, decoded in this file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantrt.engine.engine import Engine
from quantrt.errors import CheckpointError, ConfigError, PlatformError
from quantrt.layers.linear import QuantLinear
from quantrt.platforms.rocm.emulation import EmulatedRocmPlatform
from quantrt.platforms.xpu.cpu_platform import CpuPlatform
from quantrt.quant.detect import detect_quantization
from tests.helpers_models import max_prompt_logprob_diff

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
TABLE = torch.tensor(E2M1 + [-v for v in E2M1], dtype=torch.float64)
PROMPT = list(range(5, 37))
MI300 = EmulatedRocmPlatform()


def _nvfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """ModelOpt NVFP4 of one weight [N, K]: global = amax / (6 * 448); block scale = block amax / (6 * global)
    in e4m3; codes = nearest e2m1 of w / (scale * global); two codes per byte, even element low."""
    w = w.double()
    n, k = w.shape
    g = w.abs().max() / (6 * 448)
    s = (w.reshape(n, k // 16, 16).abs().amax(-1) / (6 * g)).to(torch.float8_e4m3fn)     # [N, K/16]
    v = w / (s.double().repeat_interleave(16, 1) * g)
    v = torch.nan_to_num(v, nan=0.0)
    codes = (v[..., None] - TABLE).abs().argmin(-1).to(torch.uint8)                     # [N, K] 0..15
    return {"weight": codes[:, 0::2] | (codes[:, 1::2] << 4), "weight_scale": s,
            "weight_scale_2": g.float().reshape(()), "input_scale": torch.tensor(0.01)}


def dequant_nvfp4_f64(t: dict[str, torch.Tensor]) -> torch.Tensor:
    b = t["weight"]
    codes = torch.stack([b & 0xF, b >> 4], -1).reshape(b.shape[0], -1).long()
    return TABLE[codes] * t["weight_scale"].double().repeat_interleave(16, 1) * t["weight_scale_2"].double()


def _fp8(w: torch.Tensor, amax_in: float) -> dict[str, torch.Tensor]:
    s = w.abs().max().float() / 448
    return {"weight": (w.float() / s).to(torch.float8_e4m3fn), "weight_scale": s.reshape(()),
            "input_scale": torch.tensor(amax_in / 448, dtype=torch.float32)}


def _input_amax(hf, prompt: list[int]) -> dict[str, float]:
    amax: dict[str, float] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: amax.__setitem__(n, float(i[0].abs().max())))
             for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    with torch.no_grad():
        hf(torch.tensor([prompt]))
    for h in hooks:
        h.remove()
    return amax


def write_modelopt(src: Path, dst: Path, algo: str, hf=None) -> dict[str, dict[str, torch.Tensor]]:
    """Quantize every decoder linear of a float checkpoint in ModelOpt's layout (hf_quant_config.json,
    lm_head excluded); returns the written tensors per linear prefix."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    amax = _input_amax(hf, PROMPT) if algo == "FP8" else {}
    out, layers = {}, {}
    for name, t in sd.items():
        if not (name.endswith("proj.weight") and "layers." in name):
            out[name] = t
            continue
        prefix = name[: -len(".weight")]
        layers[prefix] = _nvfp4(t) if algo == "NVFP4" else _fp8(t, amax[prefix])
        out.update({f"{prefix}.{k}": v for k, v in layers[prefix].items()})
    save_file(out, str(dst / "model.safetensors"))
    q = {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    if algo == "NVFP4":
        q["group_size"] = 16
    (dst / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": q}))
    return layers


@pytest.fixture(scope="module")
def nvfp4(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("modelopt") / "nvfp4"
    return d, write_modelopt(tiny_models["llama"][0], d, "NVFP4")


def test_nvfp4_weights_equal_the_float64_dequantization(nvfp4, tiny_models):
    d, layers = nvfp4
    assert detect_quantization(str(d), {}, None)[0] == "modelopt_fp4"
    eng = Engine(model_path=str(d), max_total_tokens=512)
    assert eng.quant_method == "modelopt_fp4"
    checked = 0
    for mod in eng.model.modules():
        if isinstance(mod, QuantLinear) and mod.is_quantized:
            want = torch.cat([dequant_nvfp4_f64(layers[p]) for p in mod.shard_prefixes()])
            got = torch.cat([k.spec.weight.dequantize(torch.float64) for k in mod.kernels])
            torch.testing.assert_close(got, want, rtol=2e-7, atol=0)  # fp32 product of exact factors
            checked += 1
    assert checked == 4 * 2
    weights = {f"{p}.weight": dequant_nvfp4_f64(t).float() for p, t in layers.items()}
    diff = max_prompt_logprob_diff(eng, tiny_models["llama"][1], weights, PROMPT)
    assert diff < 2e-3, diff  # W4A16 reference path = HF with the dequantized weights (fp32)


def test_generic_modelopt_flag_resolves_by_quant_algo(nvfp4):
    d, _ = nvfp4
    assert detect_quantization(str(d), {}, "modelopt")[0] == "modelopt_fp4"
    flat = {"quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4"}}
    assert detect_quantization("m", flat, None)[0] == "modelopt_fp4"
    assert detect_quantization(str(d), {}, "petit_nvfp4")[0] == "petit_nvfp4"


def test_petit_nvfp4_on_emulated_mi300_matches_the_reference_path(nvfp4):
    """--quantization petit_nvfp4 on the (emulated) MI300: every quantized linear runs Petit's W4A16 kernel
    and the prompt log-probs equal the CPU modelopt_fp4 reference path's in bf16 (same dequantized weights)."""
    from quantrt.platforms.rocm.petit import PetitNvfp4Kernel

    d, _ = nvfp4
    common = {"model_path": str(d), "dtype": "bfloat16", "max_total_tokens": 512}
    rocm = Engine(platform=MI300, quantization="petit_nvfp4", **common)
    cpu = Engine(platform=CpuPlatform(), **common)
    assert rocm.quant_method == "petit_nvfp4"
    kinds = {type(k) for m in rocm.model.modules() if isinstance(m, QuantLinear) and m.is_quantized
             for k in m.kernels}
    assert kinds == {PetitNvfp4Kernel}
    kw = {"sampling_params": {"max_new_tokens": 1, "temperature": 0}, "return_logprob": True,
          "logprob_start_len": 0}

    def lp(eng):
        return torch.tensor([x for x, _, _ in eng.generate(input_ids=PROMPT, **kw)["meta_info"]
                             ["input_token_logprobs"][1:]])

    err = (lp(rocm) - lp(cpu)).abs()
    assert err.max() < 0.1 and err.mean() < 0.02, (float(err.max()), float(err.mean()))
    with pytest.raises(PlatformError, match="modelopt_fp4 quantization is currently not supported in ROCm. Methods allowed on ROCm: .*petit_nvfp4"):
        Engine(platform=MI300, **common)  # modelopt_fp4 itself is not on SGLang's ROCm allow-list


def test_petit_needs_petit_kernel():
    from quantrt.platforms.rocm.petit import load_petit

    with pytest.raises(PlatformError, match="no `petit_kernel` module is installed; install petit-kernel"):
        load_petit(find_spec=lambda n: None)

    def broken(name):
        raise OSError("libamdhip64.so: cannot open")
    with pytest.raises(PlatformError, match="failed to import .*libamdhip64"):
        load_petit(find_spec=lambda n: object(), import_module=broken)


def test_fp8_linears_match_the_float64_formula(tiny_models, tmp_path):
    src, hf = tiny_models["llama"]
    layers = write_modelopt(src, tmp_path / "fp8", "FP8", hf)
    eng = Engine(model_path=str(tmp_path / "fp8"), max_total_tokens=512)
    assert eng.quant_method == "modelopt_fp8"
    torch.manual_seed(0)
    for mod in eng.model.modules():
        if not (isinstance(mod, QuantLinear) and mod.is_quantized):
            continue
        ts = [layers[p] for p in mod.shard_prefixes()]
        s_in = max(float(t["input_scale"]) for t in ts)   # fused shards share the max input scale (SGLang)
        x = torch.randn(5, mod.in_features) * s_in * 300
        xq = (x.double() / s_in).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s_in
        w = torch.cat([t["weight"].double() * t["weight_scale"].double() for t in ts])
        want = xq @ w.T
        err = ((mod(x).double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, (mod.parent, err)
    out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert len(out["output_ids"]) == 4


def _edit(d: Path, name: str, value) -> None:
    sd = load_file(str(d / "model.safetensors"))
    if value is None:
        sd.pop(name)
    else:
        sd[name] = value
    save_file(sd, str(d / "model.safetensors"))


@pytest.mark.parametrize("name,value,exc,msg", [
    ("model.layers.0.self_attn.q_proj.weight_scale", torch.ones(64, 4), CheckpointError,
     r"q_proj.weight_scale is torch.float32 \(64, 4\); NVFP4 stores float8_e4m3fn \[64, 4\]"),
    ("model.layers.0.mlp.down_proj.weight", torch.zeros(64, 32, dtype=torch.uint8), CheckpointError,
     r"down_proj.weight is torch.uint8 \(64, 32\); NVFP4 stores uint8 \[64, 64\] \(two e2m1 codes per byte\)"),
    ("model.layers.1.mlp.up_proj.weight_scale_2", torch.tensor(-1.0), CheckpointError,
     "up_proj.weight_scale_2 must be positive and finite"),
    ("model.layers.1.mlp.up_proj.weight_scale_2", None, CheckpointError, "missing tensors: .*up_proj.weight_scale_2"),
])
def test_bad_nvfp4_checkpoints(nvfp4, tmp_path, name, value, exc, msg):
    d = tmp_path / "bad"
    shutil.copytree(nvfp4[0], d)
    _edit(d, name, value)
    with pytest.raises(exc, match=msg):
        Engine(model_path=str(d), max_total_tokens=256)


def test_bad_nvfp4_configs(nvfp4, tmp_path):
    d = tmp_path / "cfg"
    shutil.copytree(nvfp4[0], d)
    doc = json.loads((d / "hf_quant_config.json").read_text())
    doc["quantization"]["group_size"] = 32
    (d / "hf_quant_config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="NVFP4 group_size is 32; only 16 exists"):
        Engine(model_path=str(d), max_total_tokens=256)
    flat = {"quant_algo": "NVFP4", "group_size": 16, "config_groups": {"g": {"weights": {"group_size": 32}}}}
    from quantrt.quant.formats.modelopt import ModelOptFp4Format, ModelOptFp8Format

    with pytest.raises(ConfigError, match=r"inconsistent group sizes \[16, 32\]"):
        ModelOptFp4Format.from_config(flat)
    with pytest.raises(ConfigError, match="modelopt_fp8 serves ModelOpt FP8 checkpoints, but quant_algo is NVFP4"):
        ModelOptFp8Format.from_config({"quant_algo": "NVFP4"})


def test_exclusion_globs():
    from quantrt.quant.formats.modelopt import ModelOptFp8Format

    f = ModelOptFp8Format.from_config({"quant_algo": "FP8", "exclude_modules": ["lm_head", "*mlp.gate*",
                                                                                  "model.layers.1.*"]})
    assert not f.is_quantized("lm_head") and not f.is_quantized("model.layers.0.mlp.gate_proj")
    assert not f.is_quantized("model.layers.1.self_attn.q_proj")
    assert not f.is_quantized("language_model.lm_head")
    assert f.is_quantized("model.layers.0.mlp.up_proj") and f.is_quantized("model.layers.10.self_attn.q_proj")


def test_nvfp4_moe_experts_on_the_reference_path(tiny_models, tmp_path):
    """Per-expert ModelOpt NVFP4 tensors (`experts.<e>.<proj>.weight` ...) become fp4 MicroWeights equal to the
    float64 dequantization; the router (`mlp.gate`, excluded) stays float; the model generates."""
    src = tiny_models["qwen3_moe"][0]
    d = tmp_path / "moe"
    shutil.copytree(src, d)
    sd = load_file(str(d / "model.safetensors"))
    out, layers = {}, {}
    for name, t in sd.items():
        if ".experts." in name and name.endswith("proj.weight"):
            prefix = name[: -len(".weight")]
            layers[prefix] = _nvfp4(t)
            out.update({f"{prefix}.{k}": v for k, v in layers[prefix].items()})
        else:
            out[name] = t
    save_file(out, str(d / "model.safetensors"))
    q = {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head", "*self_attn*", "*mlp.gate",
                                                                     "model.layers.1.mlp.*"]}
    (d / "hf_quant_config.json").write_text(json.dumps({"quantization": q}))
    eng = Engine(model_path=str(d), max_total_tokens=512)
    moe = eng.model.model.layers[0].mlp
    for e in (0, 7):
        for j, proj in enumerate(("gate_proj", "up_proj", "down_proj")):
            w = moe.qexperts[e][j]
            assert type(w).__name__ == "MicroWeight" and w.block == 16
            want = dequant_nvfp4_f64(layers[f"model.layers.0.mlp.experts.{e}.{proj}"])
            torch.testing.assert_close(w.dequantize(torch.float64), want, rtol=2e-7, atol=0)
    out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert len(out["output_ids"]) == 4


def test_missing_petit_declines_with_the_install_hint():
    """On ROCm without petit_kernel the Petit kernel declines and says what to install (reference runs)."""
    import importlib.util

    from quantrt.platforms.rocm.petit import PetitNvfp4Kernel
    from quantrt.platforms.rocm.platform import RocmPlatform
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import WEIGHT_ONLY, MicroWeight

    assert importlib.util.find_spec("petit_kernel") is None  # the CI venv has no Petit (nor ROCm)
    w = MicroWeight(torch.zeros(32, 64, dtype=torch.uint8), torch.ones(32, 4), 16, torch.tensor(1.0))
    ok, why = PetitNvfp4Kernel.can_implement(LinearSpec(w, WEIGHT_ONLY, torch.bfloat16), RocmPlatform(arch="gfx942"))
    assert not ok and "no `petit_kernel` module is installed; install petit-kernel" in why
