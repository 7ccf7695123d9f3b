"""Every format's MoE path (fp8, AWQ/GPTQ = moe_wna16, compressed-tensors from llm-compressor, GGUF, online
methods, the YAML `moe:` section) against transformers on the dequantized weights; strict loading."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantrt.engine.engine import Engine
from quantrt.layers.moe.experts import ReferenceMoEKernel
from quantrt.layers.moe.routing import select_experts
from quantrt.platforms.xpu.cpu_platform import CpuPlatform
from quantrt.quant.formats.packing import pack_awq, pack_lsb
from quantrt.quant.quantize import quantize_fp8
from quantrt.quant.weights import ActKind
from tests.helpers_models import max_prompt_logprob_diff

CPU = CpuPlatform()


PROMPT = list(range(5, 37))
_LINEAR = re.compile(r"model\.layers\.\d+\..*\.(\w+_proj|w[123])\.weight$")
_EXPERT = re.compile(r"(model\.layers\.\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_HF_PROJ = {"gate_proj": 0, "up_proj": 1, "down_proj": 2, "w1": 0, "w3": 1, "w2": 2}


def hf_layout(deq: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint-named dequantized weights -> transformers v5 state-dict names (experts fused:
    `mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I])."""
    out, experts = {}, {}
    for name, w in deq.items():
        m = _EXPERT.match(name)
        if m is None:
            out[name] = w
            continue
        experts.setdefault(m.group(1), {})[(int(m.group(3)), _HF_PROJ[m.group(4)])] = w
    for layer, ws in experts.items():
        n = 1 + max(e for e, _ in ws)
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([ws[(e, 0)], ws[(e, 1)]]) for e in range(n)])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([ws[(e, 2)] for e in range(n)])
    return out


def requantize(src, dst, quant, qcfg: dict | None) -> dict[str, torch.Tensor]:
    """Copy a float checkpoint, replacing every decoder linear `<p>.weight` (experts included, router
    not) by the tensors `quant(p, w) -> (tensors by suffix, dequantized w)`; returns the dequantized
    weights in transformers' layout."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    out, deq = {}, {}
    for name, t in sd.items():
        if not _LINEAR.match(name):
            out[name] = t
            continue
        prefix = name[: -len(".weight")]
        tensors, w = quant(prefix, t)
        out.update({f"{prefix}.{k}": v for k, v in tensors.items()})
        deq[name] = w
    save_file(out, str(dst / "model.safetensors"))
    if qcfg is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"] = qcfg
        (dst / "config.json").write_text(json.dumps(cfg))
    return hf_layout(deq)


def moe_layers(eng) -> list:
    from quantrt.layers.moe.layer import FusedMoE

    return [m for m in eng.model.modules() if isinstance(m, FusedMoE)]


def _fp8_tensor_static(prefix, w):
    fw = quantize_fp8(w, "tensor")
    return {"weight": fw.data, "weight_scale": fw.scale, "input_scale": torch.tensor(0.03)}, fw.dequantize()


def _fp8_block(prefix, w):
    fw = quantize_fp8(w, "block", (32, 32))
    return {"weight": fw.data, "weight_scale_inv": fw.scale}, fw.dequantize()


def check_experts_loaded(eng, ref: dict[str, torch.Tensor], rel: float = 0.0) -> None:
    """Every MoE layer's expert weights dequantize to the producer's dequantized weights, and its
    selected kernel equals the reference MoE kernel (same activation quantization) on random input
    (up to fp32 summation order, or a relative error `rel` for kernels that round to bf16 inside)."""
    for m in moe_layers(eng):
        layer = m.prefix.rsplit(".", 1)[0]
        gu, d = ref[f"{layer}.mlp.experts.gate_up_proj"], ref[f"{layer}.mlp.experts.down_proj"]
        for e, (g, u, dn) in enumerate(m.spec.experts):
            torch.testing.assert_close(torch.cat([g.dequantize(), u.dequantize()]), gu[e], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(dn.dequantize(), d[e], atol=1e-6, rtol=1e-5)
        torch.manual_seed(0)
        x = torch.randn(12, m.hidden).to(m.dtype)
        w, ids = select_experts(torch.randn(12, m.routing.num_experts), m.routing)
        want = ReferenceMoEKernel.prepare(m.spec, CPU).apply(x, w, ids).double()
        got = m.experts(x, w, ids).double()
        if rel:
            assert (got - want).norm() / want.norm() < rel
        else:
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def chosen_logprob_err(eng, hf, ref: dict[str, torch.Tensor]) -> torch.Tensor:
    """|our - transformers'| log p of each next prompt token, transformers with `ref` swapped in."""
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd.update(ref)
    model = type(hf)(hf.config).eval()
    model.load_state_dict(sd)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].double(), -1)
    want = lp[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 1, "temperature": 0},
                       return_logprob=True, logprob_start_len=0)
    ours = torch.tensor([lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]], dtype=torch.float64)
    return (ours - want).abs()


def check_w8a8_close(eng, hf, ref) -> None:
    """Activation quantization is the only difference left from transformers (which runs the dequantized
    weights in fp32); on these random tiny models whole-model fp8/int8 W8A8 moves the chosen-token
    log p by ~0.05 on average (measured max 0.35)."""
    err = chosen_logprob_err(eng, hf, ref)
    assert err.mean() < 0.15 and err.max() < 0.8, err


@pytest.mark.parametrize("arch, quant, qcfg", [
    ("qwen3_moe", _fp8_tensor_static, {"quant_method": "fp8", "activation_scheme": "static"}),
    ("mixtral", _fp8_block, {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}),
], ids=["fp8-tensor-static", "fp8-block-dynamic"])
def test_fp8_moe_checkpoints_load_and_run(tiny_models, tmp_path, arch, quant, qcfg):
    src, hf = tiny_models[arch]
    ref = requantize(src, tmp_path / "ckpt", quant, qcfg)
    eng = Engine(model_path=str(tmp_path / "ckpt"), max_total_tokens=512)
    assert {m.impl for m in moe_layers(eng)} == {"cpu_moe_dequant"}
    assert moe_layers(eng)[0].spec.acts[0][0].kind is not ActKind.NONE      # experts quantize activations too
    check_experts_loaded(eng, ref)
    check_w8a8_close(eng, hf, ref)


def _gptq(bits: int, group: int, sym: bool):
    def quant(prefix, w):
        n, k = w.shape
        wg = w.view(n, k // group, group)
        qmax = (1 << bits) - 1
        if sym:
            s = wg.abs().amax(-1) / ((qmax + 1) // 2 - 0.5)
            z = torch.full_like(s, (qmax + 1) // 2)
        else:
            lo, hi = wg.amin(-1), wg.amax(-1)
            s = (hi - lo) / qmax
            z = (-lo / s).round().clamp(0, qmax)
        s = s.half().float()
        q = (wg / s[..., None] + z[..., None]).round().clamp(0, qmax).view(n, k)
        deq = (q - z.repeat_interleave(group, 1)) * s.repeat_interleave(group, 1)
        zs = (z - 1).clamp(min=0) if sym else z - 1                               # v1 zeros stored minus one
        tensors = {"qweight": pack_lsb(q.t().to(torch.uint8).contiguous(), bits, 0),
                   "qzeros": pack_lsb(zs.t().to(torch.uint8).contiguous(), bits, 1),
                   "scales": s.t().half().contiguous()}
        return tensors, deq
    return quant


def _awq(group: int):
    def quant(prefix, w):
        n, k = w.shape
        wg = w.view(n, k // group, group)
        lo, hi = wg.amin(-1), wg.amax(-1)
        s = ((hi - lo) / 15).half().float()
        z = (-lo / s).round().clamp(0, 15)
        q = (wg / s[..., None] + z[..., None]).round().clamp(0, 15).view(n, k)
        deq = (q - z.repeat_interleave(group, 1)) * s.repeat_interleave(group, 1)
        return {"qweight": pack_awq(q.t().to(torch.uint8).contiguous()), "qzeros": pack_awq(z.t().to(torch.uint8).contiguous()),
                "scales": s.t().half().contiguous()}, deq
    return quant


@pytest.mark.parametrize("name, quant, qcfg", [
    ("gptq-int4-sym", _gptq(4, 32, True), {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True}),
    ("gptq-int4-asym", _gptq(4, 32, False), {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False}),
    ("gptq-int8-sym", _gptq(8, 32, True), {"quant_method": "gptq", "bits": 8, "group_size": 32, "sym": True}),
    ("awq-int4", _awq(32), {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}),
])
def test_awq_gptq_experts_run_moe_wna16_and_match_transformers(tiny_models, tmp_path, name, quant, qcfg):
    src, hf = tiny_models["qwen3_moe"]
    ref = requantize(src, tmp_path / "ckpt", quant, qcfg)
    eng = Engine(model_path=str(tmp_path / "ckpt"), max_total_tokens=512)
    moe = moe_layers(eng)[0]
    assert moe.impl == "cpu_moe_dequant", moe.kernel_choice      # fp32 compute: exact per-expert dequant
    assert type(moe.spec.experts[0][0]).__name__ == "IntWeight"
    check_experts_loaded(eng, ref)
    assert max_prompt_logprob_diff(eng, hf, ref, PROMPT) < 2e-3
    bf = Engine(model_path=str(tmp_path / "ckpt"), max_total_tokens=512, dtype="bfloat16")
    want = "cpu_moe_int4_packed" if "int4" in name else "cpu_moe_dequant"   # int8 g32: not per-channel
    assert moe_layers(bf)[0].impl == want, moe_layers(bf)[0].kernel_choice
    check_experts_loaded(bf, ref, rel=1e-2)
    assert chosen_logprob_err(bf, hf, ref).mean() < 0.1             # bf16 compute end to end


@pytest.mark.parametrize("name, quant, qcfg", [
    ("gptq-int4-sym", _gptq(4, 32, True), {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
                                           "desc_act": False}),
    ("awq-int4", _awq(32), {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}),
])
def test_quantization_moe_wna16_flag_on_gptq_awq_checkpoints(tiny_models, tmp_path, name, quant, qcfg):
    """`--quantization moe_wna16` (SGLang's MoeWNA16Config override): accepted on gptq/awq checkpoints,
    reported as moe_wna16; experts run the wna16 MoE kernel, the model matches transformers."""
    src, hf = tiny_models["qwen3_moe"]
    ref = requantize(src, tmp_path / "ckpt", quant, qcfg)
    eng = Engine(model_path=str(tmp_path / "ckpt"), quantization="moe_wna16", max_total_tokens=512)
    assert eng.quant_method == "moe_wna16" and eng.quant_format.name == qcfg["quant_method"]
    assert {m.impl for m in moe_layers(eng)} == {"cpu_moe_dequant"}
    check_experts_loaded(eng, ref)
    assert max_prompt_logprob_diff(eng, hf, ref, PROMPT) < 2e-3


def test_quantization_moe_wna16_rejects_other_checkpoints():
    from quantrt.errors import ConfigError
    from quantrt.quant.detect import detect_quantization

    def detect(qcfg):
        return detect_quantization("/nonexistent", {"quantization_config": qcfg} if qcfg else {}, "moe_wna16")

    assert detect({"quant_method": "gptq", "bits": 8, "group_size": 128})[0] == "moe_wna16"
    with pytest.raises(ConfigError, match=r"moe_wna16 applies to GPTQ \(bits 4 or 8, desc_act false\) or AWQ "
                                          r"\(4-bit\) checkpoints, but it is quantized with fp8; drop --quantization "
                                          r"or pass --quantization fp8"):
        detect({"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(ConfigError, match="but its gptq config has bits=4, desc_act=true"):
        detect({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True})
    with pytest.raises(ConfigError, match="but its gptq config has bits=3"):
        detect({"quant_method": "gptq", "bits": 3, "group_size": 128})
    with pytest.raises(ConfigError, match="has no quantization config .*does not quantize float checkpoints"):
        detect(None)


# -- compressed-tensors: MoE checkpoints written by llm-compressor itself (its own venv) -------------------
_CT_IGNORE = ["lm_head", "re:.*mlp.gate$"]            # the router stays float, as llm-compressor MoE recipes do
CT_MOE = {  # name -> (llm-compressor spec, CPU MoE kernel in fp32, weight-only?)
    # symmetric: compressed-tensors 0.19's own MoE decompression (through transformers 5.17) fails on
    # asymmetric experts ("Asymmetric quant requires zero-point values"); asym experts are covered by GPTQ/AWQ
    "W4A16_g32": ({"config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True}}},
        "ignore": _CT_IGNORE}, "cpu_moe_dequant", True),
    "W8A16_channel": ({"config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}}},
        "ignore": _CT_IGNORE}, "cpu_moe_dequant", True),
    "W8A8_int8": ({"scheme": "W8A8", "ignore": _CT_IGNORE}, "cpu_moe_dequant", False),
    "FP8_DYNAMIC": ({"scheme": "FP8_DYNAMIC", "ignore": _CT_IGNORE}, "cpu_moe_dequant", False),
}
# compressed-tensors' own per-module decompression (its compressor registry, keyed by the checkpoint's
# `format`), applied to every quantized module of the safetensors file; transformers 5.17's fused-expert
# decompression cannot be used (it concatenates per-expert tensors it has not decompressed yet)
_CT_DEQ = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
for src, out in json.loads(sys.argv[1]):
    qc = json.load(open(f"{src}/config.json"))["quantization_config"]
    (group,) = qc["config_groups"].values()
    scheme = QuantizationScheme(**{**group, "format": qc["format"]})
    comp = BaseCompressor.get_value_from_registry(qc["format"])
    sd = load_file(f"{src}/model.safetensors")
    mods = {}
    for k, v in sd.items():
        mods.setdefault(k.rsplit(".", 1)[0], {})[k.rsplit(".", 1)[1]] = v
    res = {}
    for m, local in mods.items():
        if "weight_scale" in local:
            local = comp.decompress(local, scheme)
        res[f"{m}.weight"] = local["weight"].float().contiguous() if "weight" in local else None
    save_file({k: v for k, v in res.items() if v is not None and v.dim() == 2}, out)
"""


@pytest.fixture(scope="module")
def ct_moe(tiny_models):
    """name -> (checkpoint dir, compressed-tensors' own decompression of the whole model), kept in
    .cache/ct-moe keyed by the spec, the producer pins and the source checkpoint's bytes."""
    import hashlib
    from pathlib import Path

    from tests.producers import PINS, _run, produce

    src = tiny_models["qwen3_moe"][0]
    digest = hashlib.sha1((src / "model.safetensors").read_bytes()).hexdigest()
    root = Path(__file__).resolve().parents[1] / ".cache" / "ct-moe"
    dirs = {n: root / f"{n}-{hashlib.sha1(json.dumps([spec, PINS, digest]).encode()).hexdigest()[:10]}"
            for n, (spec, _, _) in CT_MOE.items()}
    deq = {n: d.parent / f"{d.name}.deq.safetensors" for n, d in dirs.items()}   # beside, not inside
    todo = [n for n, d in dirs.items() if not (d / ".complete").exists()]
    if todo:
        produce([(src, dirs[n], CT_MOE[n][0]) for n in todo])
        for n in todo:
            (dirs[n] / ".complete").write_text("")
    todo = [n for n in dirs if not deq[n].exists()]
    if todo:
        _run(["-c", _CT_DEQ, json.dumps([[str(dirs[n]), str(deq[n])] for n in todo])])
    return {n: (d, load_file(str(deq[n]))) for n, d in dirs.items()}


@pytest.mark.parametrize("name", sorted(CT_MOE))
def test_llm_compressor_moe_checkpoints(ct_moe, tiny_models, name):
    """Experts equal compressed-tensors' own decompression; the selected CPU kernel equals the reference;
    logprobs match transformers on the decompressed weights (weight-only: tightly; W8A8: plus our
    per-token activation rounding)."""
    path, deq = ct_moe[name]
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    sd = load_file(str(path / "model.safetensors"))
    up = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.startswith("model.layers.0.mlp.experts.3.up_proj.")}
    assert "weight_scale" in up and ("weight_packed" in up or up["weight"].element_size() == 1), sorted(up)
    hf = tiny_models["qwen3_moe"][1]
    ref = hf_layout({k: v for k, v in deq.items() if _LINEAR.match(k)})
    eng = Engine(model_path=str(path), max_total_tokens=512)
    assert eng.quant_method == "compressed-tensors"
    assert moe_layers(eng)[0].impl == CT_MOE[name][1], moe_layers(eng)[0].kernel_choice
    check_experts_loaded(eng, ref)
    if CT_MOE[name][2]:
        assert max_prompt_logprob_diff(eng, hf, ref, PROMPT) < 2e-3
    else:
        check_w8a8_close(eng, hf, ref)


# -- online methods and the sglang-jax YAML `moe:` section on a float MoE checkpoint ------------------------
def experts_hf_layout(eng) -> dict[str, torch.Tensor]:
    """The engine's (quantized) experts, dequantized, in transformers' layout."""
    out = {}
    for m in moe_layers(eng):
        layer = m.prefix.rsplit(".", 1)[0]
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([g.dequantize(), u.dequantize()]) for g, u, _ in m.spec.experts])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([d.dequantize() for _, _, d in m.spec.experts])
    return out


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


@pytest.mark.parametrize("kwargs, scheme, act, kernel, min_db", [
    ({"quantization": "fp8"}, "fp8-channel", "float8_e4m3fn-dynamic_token", "cpu_moe_dequant", 25),
    ({"quantization": "w8a8_fp8"}, "fp8-channel", "float8_e4m3fn-dynamic_token", "cpu_moe_dequant", 25),
    ({"quantization": "w8a8_int8"}, "int8-channel-sym", "int8-dynamic_token", "cpu_moe_dequant", 35),
    ({"quantization_config_path": "int8_w8a8"}, "int8-channel-sym", "int8-dynamic_token", "cpu_moe_dequant", 35),
    ({"quantization_config_path": "fp8"}, "fp8-channel", "a16", "cpu_moe_dequant", 25),
], ids=["fp8", "w8a8_fp8", "w8a8_int8", "yaml-int8_w8a8", "yaml-fp8"])
def test_online_methods_quantize_the_experts(tiny_models, kwargs, scheme, act, kernel, min_db):
    path, hf = tiny_models["qwen3_moe"]
    eng = Engine(model_path=str(path), max_total_tokens=512, **kwargs)
    moe = moe_layers(eng)[0]
    assert moe.spec.schemes() == {scheme} and moe.spec.act_schemes() == {act}
    assert moe.impl == kernel, moe.kernel_choice
    ref = experts_hf_layout(eng)
    orig = hf.state_dict()
    for k, v in ref.items():
        assert _sqnr(orig[k], v) > min_db, k
    check_experts_loaded(eng, ref)
    check_w8a8_close(eng, hf, ref)


def _yaml(tmp_path, moe: str, linear: str = "model/layers/.*/self_attn/.*") -> str:
    p = tmp_path / "rules.yaml"
    p.write_text(f"quantization:\n  linear:\n    rules:\n      - module_path: '{linear}'\n"
                 f"        weight_dtype: 'int8'\n        activation_dtype: null\n  moe:\n{moe}")
    return str(p)


def test_yaml_moe_section_governs_experts_and_linear_rules_the_rest(tiny_models, tmp_path):
    """Experts follow `moe:` only (a linear rule matching everything does not reach them); shared experts
    (Qwen2-MoE) are ordinary linears under the linear rules; `moe: weight_dtype: null` keeps them float."""
    path = tiny_models["qwen2_moe"][0]
    eng = Engine(model_path=str(path), max_total_tokens=512, quantization_config_path=_yaml(
        tmp_path, "    weight_dtype: 'float8_e4m3fn'\n    activation_dtype: 'float8_e4m3fn'\n", linear=".*"))
    moe = moe_layers(eng)[0]
    assert moe.spec.schemes() == {"fp8-channel"} and moe.spec.act_schemes() == {"float8_e4m3fn-dynamic_token"}
    desc = moe.shared.gate_up_proj.kernel_desc   # int8 weight-only: an int8 kernel or cpu_native_int (native ext)
    assert moe.shared.gate_up_proj.is_quantized and ("int8" in desc or desc.startswith("cpu_native_int")), desc
    eng = Engine(model_path=str(path), max_total_tokens=512, quantization_config_path=_yaml(
        tmp_path, "    weight_dtype: null\n    activation_dtype: null\n"))
    assert moe_layers(eng)[0].impl == "grouped" and moe_layers(eng)[0].qexperts is None


@pytest.mark.parametrize("moe, match", [
    ("    weight_dtype: 'int8'\n    activation_dtype: 'float8_e4m3fn'\n", "moe weight torch.int8 with activations"),
    ("    weight_dtype: null\n    activation_dtype: 'int8'\n", "moe activation_dtype torch.int8 needs a quantized"),
    ("    weight_dtype: 'int4'\n    activation_dtype: null\n", "moe weight_dtype: unknown dtype 'int4'; choose one of"),
])
def test_yaml_bad_moe_sections_fail_clearly(tiny_models, tmp_path, moe, match):
    from quantrt.errors import QuantrtError

    with pytest.raises(QuantrtError, match=match):
        Engine(model_path=str(tiny_models["qwen3_moe"][0]), max_total_tokens=256,
               quantization_config_path=_yaml(tmp_path, moe))


# -- strict loading of quantized experts -------------------------------------------------------------------
@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("model.layers.0.mlp.experts.3.down_proj.qzeros"),
     r"missing tensors: model\.layers\.0\.mlp\.experts\.3\.down_proj"),
    (lambda sd: sd.__setitem__("model.layers.0.mlp.experts.2.up_proj.weight_scale", torch.ones(1)),
     r"unexpected tensor model\.layers\.0\.mlp\.experts\.2\.up_proj\.weight_scale: .* expects g_idx, qweight, qzeros, scales"),
    (lambda sd: sd.__setitem__("model.layers.0.mlp.experts.1.gate_proj.scales", torch.ones(3, 32).half()),
     r"model\.layers\.0\.mlp\.experts\.1\.gate_proj"),
], ids=["missing-qzeros", "unknown-suffix", "bad-scales-shape"])
def test_quantized_expert_tensors_load_strictly(tiny_models, tmp_path, edit, match):
    from quantrt.errors import QuantrtError

    src = tiny_models["qwen3_moe"][0]
    requantize(src, tmp_path / "ckpt", _gptq(4, 32, False), {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                                           "sym": False})
    sd = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    edit(sd)
    save_file(sd, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(QuantrtError, match=match):
        Engine(model_path=str(tmp_path / "ckpt"), max_total_tokens=256)
