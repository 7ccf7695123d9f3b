"""msModelSlim checkpoints (quant_model_description.json) on the reference path: detection precedence,
per-layer agreement with a float64 evaluation of the NPU formulas on the on-disk tensors, end to end on a
tiny Llama, and every bad input's error message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantrt.engine.engine import Engine
from quantrt.errors import CheckpointError, ConfigError, NotSupportedYet
from quantrt.layers.linear import QuantLinear
from quantrt.quant.detect import detect_quantization
from quantrt.quant.formats.modelslim import decode_deq_scale

PROMPT = list(range(5, 37))


def _act_ranges(hf, prompt: list[int]) -> dict[str, tuple[float, float]]:
    """Calibration: min/max of every linear's input over one prompt (what msModelSlim's static W8A8 needs)."""
    ranges: dict[str, tuple[float, float]] = {}
    hooks = []
    for name, mod in hf.named_modules():
        if isinstance(mod, torch.nn.Linear) and "layers." in name:
            def hook(m, inp, out, name=name):
                x = inp[0].detach().float()
                ranges[name] = (float(x.min()), float(x.max()))
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        hf(torch.tensor([prompt]))
    for h in hooks:
        h.remove()
    return ranges


def write_modelslim(src: Path, dst: Path, hf, kind: str = "W8A8", int64_deq: bool = False,
                    calib: list[int] | None = None) -> None:
    """Quantize the decoder linears of a float checkpoint into msModelSlim's on-disk layout (FORMATS.md §2.13):
    per-channel symmetric RTN weights (weight_offset 0), and for W8A8 asymmetric static activations
    calibrated on `calib` (default PROMPT)."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    ranges = _act_ranges(hf, calib or PROMPT) if kind == "W8A8" else {}
    out: dict[str, torch.Tensor] = {}
    desc: dict[str, str] = {"model_quant_type": kind}
    qmax = 7 if kind == "W4A4_DYNAMIC" else 127
    for name, t in sd.items():
        prefix = name[: -len(".weight")]
        if not (name.endswith("proj.weight") and "layers." in name):
            out[name], desc[name] = t, "FLOAT"
            continue
        w = t.float()
        scale = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / qmax             # [N, 1]
        q = (w / scale).round().clamp(-qmax - 1, qmax).to(torch.int8)
        ts = {"weight": q, "weight_scale": scale, "weight_offset": torch.zeros_like(scale)}
        if kind == "W8A8":
            lo, hi = ranges[prefix]
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            s = (hi - lo) / 255
            off = int(round(-128 - lo / s))
            deq = (s * scale.reshape(-1)).float()                                 # [N]
            ts |= {"input_scale": torch.tensor([s], dtype=torch.float32),
                   "input_offset": torch.tensor([off], dtype=torch.int8),
                   "quant_bias": (-off * q.to(torch.int64).sum(1)).to(torch.int32),
                   "deq_scale": deq.view(torch.int32).to(torch.int64) if int64_deq else deq}
        for suffix, v in ts.items():
            out[f"{prefix}.{suffix}"] = v
            desc[f"{prefix}.{suffix}"] = kind
    save_file(out, str(dst / "model.safetensors"))
    (dst / "quant_model_description.json").write_text(json.dumps(desc, indent=1))


def npu_formula(tensors: dict[str, torch.Tensor], kind: str, x: torch.Tensor) -> torch.Tensor:
    """float64 evaluation of what the NPU computes for one linear, from the checkpoint tensors alone."""
    x = x.double()
    w = tensors["weight"].double()
    ws = tensors["weight_scale"].double().reshape(-1)
    if kind == "W8A8":
        s, off = tensors["input_scale"].double().item(), tensors["input_offset"].double().item()
        xq = ((x / s).round() + off).clamp(-128, 127)
        deq = decode_deq_scale(tensors["deq_scale"]).double()
        return deq * (xq @ w.T + tensors["quant_bias"].double())
    qmax = 7 if kind == "W4A4_DYNAMIC" else 127
    sx = x.abs().amax(-1, keepdim=True) / qmax
    return ((x / sx).round() @ w.T) * sx * ws


@pytest.fixture(scope="module")
def w8a8_dir(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("modelslim") / "w8a8"
    write_modelslim(tiny_models["llama"][0], d, tiny_models["llama"][1])
    return d


def test_description_wins_over_config_json(w8a8_dir):
    method, qcfg = detect_quantization(str(w8a8_dir), {"quantization_config": {"quant_method": "fp8"}}, None)
    assert method == "modelslim" and qcfg["model_quant_type"] == "W8A8"
    with pytest.raises(ConfigError, match=r"model config \(modelslim\) does not match.*\(fp8\)"):
        detect_quantization(str(w8a8_dir), {}, "fp8")


@pytest.mark.parametrize("kind,int64_deq", [("W8A8", False), ("W8A8", True), ("W8A8_DYNAMIC", False),
                                            ("W4A4_DYNAMIC", False)])
def test_every_linear_matches_the_float64_npu_formula(tiny_models, tmp_path, kind, int64_deq):
    d = tmp_path / kind
    write_modelslim(tiny_models["llama"][0], d, tiny_models["llama"][1], kind, int64_deq)
    eng = Engine(model_path=str(d), max_total_tokens=512)
    assert eng.quant_method == "modelslim"
    sd = load_file(str(d / "model.safetensors"))
    torch.manual_seed(0)
    checked = 0
    for mod in eng.model.modules():
        if not isinstance(mod, QuantLinear):
            continue
        prefixes = [p for p in mod.shard_prefixes() if f"{p}.weight_scale" in sd]
        if not prefixes:
            continue
        x = torch.randn(5, mod.in_features) * 2
        want = torch.cat([npu_formula({k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")},
                                      kind, x) for p in prefixes], dim=-1)
        got = mod(x).double()
        err = (got - want).abs().max() / want.abs().max()
        assert err < 1e-5, (mod.parent, float(err))
        checked += 1
    assert checked == 2 * 2 * eng.config.num_hidden_layers  # qkv, o, gate_up, down per layer


def test_w8a8_generates_close_to_the_float_model(w8a8_dir, tiny_models):
    ref = Engine(model_path=str(tiny_models["llama"][0]), max_total_tokens=512)
    q = Engine(model_path=str(w8a8_dir), max_total_tokens=512)
    params = {"max_new_tokens": 1, "temperature": 0}
    kw = {"return_logprob": True, "logprob_start_len": 0}
    a = ref.generate(input_ids=PROMPT, sampling_params=params, **kw)["meta_info"]["input_token_logprobs"][1:]
    b = q.generate(input_ids=PROMPT, sampling_params=params, **kw)["meta_info"]["input_token_logprobs"][1:]
    diff = torch.tensor([x[0] - y[0] for x, y in zip(a, b)]).abs()
    assert diff.mean() < 0.05, diff


def _edit(d: Path, fn) -> None:
    sd = load_file(str(d / "model.safetensors"))
    desc = json.loads((d / "quant_model_description.json").read_text())
    fn(sd, desc)
    save_file(sd, str(d / "model.safetensors"))
    (d / "quant_model_description.json").write_text(json.dumps(desc))


P = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("fn,exc,msg", [
    (lambda sd, d: d.pop(f"{P}.weight"), ConfigError, f"no entry for {P}.weight"),
    (lambda sd, d: d.__setitem__(f"{P}.weight", "W9A9"), ConfigError, "unknown type 'W9A9'"),
    (lambda sd, d: d.__setitem__(f"{P}.weight", "W4A8_DYNAMIC"), NotSupportedYet, "W4A8_DYNAMIC"),
    (lambda sd, d: sd.__setitem__(f"{P}.deq_scale", sd[f"{P}.deq_scale"] * 3), CheckpointError,
     "deq_scale disagrees"),
    (lambda sd, d: sd.__setitem__(f"{P}.quant_bias", sd[f"{P}.quant_bias"].float()), CheckpointError,
     "quant_bias must be int32"),
    (lambda sd, d: sd.__setitem__(f"{P}.weight_offset", sd[f"{P}.weight_offset"] + 1), CheckpointError,
     "no weight offset"),
    (lambda sd, d: sd.__setitem__(f"{P}.input_offset", torch.tensor([0.5])), CheckpointError,
     "input_offset must hold integers"),
    (lambda sd, d: sd.pop(f"{P}.input_scale"), CheckpointError, f"missing tensors: {P}.input_scale"),
])
def test_bad_checkpoints_fail_with_a_clear_message(w8a8_dir, tmp_path, fn, exc, msg):
    d = tmp_path / "bad"
    shutil.copytree(w8a8_dir, d)
    _edit(d, fn)
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        Engine(model_path=str(d), max_total_tokens=512)


def test_invalid_description_json(w8a8_dir, tmp_path):
    d = tmp_path / "badjson"
    shutil.copytree(w8a8_dir, d)
    (d / "quant_model_description.json").write_text("[1, 2")
    with pytest.raises(ConfigError, match="not valid JSON"):
        detect_quantization(str(d), {}, None)


# --- anti-outlier RMSNorm bias (`*.norm.bias`) ------------------------------------------------------------

def _norm_bias_names(n_layers: int) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(n_layers)
            for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm"]


def add_norm_biases(d: Path, names: list[str], seed: int = 1) -> dict[str, torch.Tensor]:
    """What msModelSlim's anti-outlier pass leaves on disk: a `<norm>.bias` tensor and description entry."""
    gen = torch.Generator().manual_seed(seed)
    biases: dict[str, torch.Tensor] = {}

    def fn(sd, desc):
        for n in names:
            w = sd[f"{n}.weight"]
            biases[n] = (torch.randn(w.shape, generator=gen) * 0.3).to(w.dtype)
            sd[f"{n}.bias"], desc[f"{n}.bias"] = biases[n], "FLOAT"
    _edit(d, fn)
    return biases


def _float_modelslim(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    desc = {"model_quant_type": "FLOAT"} | {k: "FLOAT" for k in load_file(str(dst / "model.safetensors"))}
    (dst / "quant_model_description.json").write_text(json.dumps(desc))


def test_norm_bias_model_matches_a_float64_reference(tiny_models, tmp_path):
    """A FLOAT msModelSlim checkpoint with norm biases vs the HF model in float64 with each biased norm's
    output shifted by its bias: every prompt position's log-probabilities agree."""
    src, hf = tiny_models["llama"]
    d = tmp_path / "normbias"
    _float_modelslim(src, d)
    biases = add_norm_biases(d, _norm_bias_names(hf.config.num_hidden_layers))
    eng = Engine(model_path=str(d), max_total_tokens=512)
    ref = type(hf)(hf.config).eval()
    ref.load_state_dict(hf.state_dict())
    ref = ref.double()
    mods = dict(ref.named_modules())
    for n, b in {n: b.double() for n, b in biases.items()}.items():
        mods[n].register_forward_hook(lambda m, i, o, b=b: o + b)
    with torch.no_grad():
        want = torch.log_softmax(ref(torch.tensor([PROMPT])).logits[0], -1)
        plain = torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0].double(), -1)
    out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 1}, return_logprob=True,
                       logprob_start_len=0, top_logprobs_num=eng.config.vocab_size)
    got = torch.full_like(want, float("nan"))
    for pos, tops in enumerate(out["meta_info"]["input_top_logprobs"][1:]):
        for lp, tok, _ in tops:
            got[pos, tok] = lp
    got, want, plain = got[:-1], want[:-1], plain[:-1]  # the last row is the sampled token's, not returned
    assert float((got - want).abs().max()) < 1e-3
    assert float((plain - want).abs().max()) > 0.1  # the biases matter


def test_norm_bias_on_quantized_checkpoint_matches_the_formula(tiny_models, tmp_path):
    src, hf = tiny_models["llama"]
    d = tmp_path / "dyn_normbias"
    write_modelslim(src, d, hf, "W8A8_DYNAMIC")
    biases = add_norm_biases(d, _norm_bias_names(hf.config.num_hidden_layers))
    eng = Engine(model_path=str(d), max_total_tokens=512)
    sd = load_file(str(d / "model.safetensors"))
    mods = dict(eng.model.named_modules())
    x = torch.randn(5, hf.config.hidden_size) * 3
    for n, b in biases.items():
        xd = x.double()
        want = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + mods[n].eps) * sd[f"{n}.weight"].double() + b.double()
        assert float((mods[n](x).double() - want).abs().max()) < 1e-5, n
    out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert len(out["output_ids"]) == 4


N0 = "model.layers.0.input_layernorm"


@pytest.mark.parametrize("fn,exc,msg", [
    (lambda sd, d: sd.__setitem__(f"{N0}.bias", torch.zeros_like(sd[f"{N0}.weight"])), CheckpointError,
     f"unexpected tensor {N0}.bias"),
    (lambda sd, d: d.__setitem__(f"{N0}.bias", "FLOAT"), CheckpointError, f"missing tensors: {N0}.bias"),
    (lambda sd, d: (d.__setitem__("model.embed_norm.bias", "FLOAT")), CheckpointError,
     "model.embed_norm is not an RMSNorm"),
    (lambda sd, d: (d.__setitem__(f"{N0}.bias", "FLOAT"), sd.__setitem__(f"{N0}.bias", torch.zeros(3))),
     CheckpointError, rf"{N0}.bias has shape \(3,\)"),
])
def test_norm_bias_is_strict(w8a8_dir, tmp_path, fn, exc, msg):
    d = tmp_path / "bad"
    shutil.copytree(w8a8_dir, d)
    _edit(d, fn)
    with pytest.raises(exc, match=msg):
        Engine(model_path=str(d), max_total_tokens=512)
