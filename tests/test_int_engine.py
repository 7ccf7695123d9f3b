"""AWQ / GPTQ end to end through the Engine: tiny checkpoints written in the real on-disk layout (our
packers + quantization_config), every linear against its dequantized weight, greedy tokens against an
Engine on the dequantized float checkpoint, and bad checkpoints that fail with clear messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantrt.engine.engine import Engine
from quantrt.layers.linear import QuantLinear
from quantrt.quant.formats.packing import pack_awq
from tests.test_awq_gptq import _dequant, _gptq_tensors, _rtn

GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 300, 12, 77, 100, 3]]


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    err = (ref - got).pow(2).sum()
    return float("inf") if err == 0 else float(10 * torch.log10(ref.pow(2).sum() / err))


def _is_quant_target(name: str) -> bool:
    return name.endswith("proj.weight") and ".layers." in name


def write_int_checkpoint(src: Path, dst: Path, qcfg: dict) -> tuple[Path, dict[str, torch.Tensor]]:
    """Quantize every decoder linear of `src` (RTN) into AWQ or GPTQ layout at `dst`; also write the
    dequantized float checkpoint at `dst`-float. Returns (float dir, {name.weight: dequantized})."""
    method, bits, g = qcfg["quant_method"], qcfg["bits"], qcfg["group_size"]
    sym, v2 = qcfg.get("sym", True), qcfg.get("checkpoint_format") == "gptq_v2"
    fdst = dst.with_name(dst.name + "-float")
    shutil.copytree(src, dst)
    shutil.copytree(src, fdst)
    sd = load_file(str(src / "model.safetensors"))
    out, flt, deq = {}, {}, {}
    for name, t in sd.items():
        if not _is_quant_target(name):
            out[name] = flt[name] = t
            continue
        prefix = name[: -len(".weight")]
        n, k = t.shape
        gs = k if g == -1 else g
        q, s, z = _rtn(t.float(), bits, gs, sym if method == "gptq" else False)
        if method == "gptq" and not v2:
            z = z.clamp(min=1)                       # v1 stores z - 1, so a true zero of 0 does not exist
        w = _dequant(q, s, z, gs)
        if method == "awq":
            tensors = {"qweight": pack_awq(q.t().contiguous()), "qzeros": pack_awq(z.t().to(torch.uint8).contiguous()),
                       "scales": s.t().half().contiguous()}
        else:
            g_idx = (torch.arange(k) // gs).to(torch.int32)
            if qcfg.get("desc_act"):                 # act-order: permute which group each column uses
                perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
                g_idx = (torch.argsort(perm) // gs).to(torch.int32)
                wg = _group_by(t.float(), g_idx, gs)             # quantize in permuted-group order
                q, s, z = _rtn(wg, bits, gs, sym)
                if not v2:
                    z = z.clamp(min=1)
                inv = torch.argsort(torch.argsort(g_idx, stable=True))
                q = q[:, inv]
                w = (q.float() - z.float()[:, g_idx.long()]) * s[:, g_idx.long()]
            tensors = _gptq_tensors(q, s, z, bits, not v2, g_idx)
        out.update({f"{prefix}.{k_}": v for k_, v in tensors.items()})
        flt[name], deq[name] = w, w
    save_file(out, str(dst / "model.safetensors"))
    save_file(flt, str(fdst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (dst / "config.json").write_text(json.dumps(cfg))
    return fdst, deq


def _group_by(w: torch.Tensor, g_idx: torch.Tensor, gs: int) -> torch.Tensor:
    """Columns of w reordered so that each run of gs columns is one group of g_idx."""
    return w[:, torch.argsort(g_idx, stable=True)]


CASES = {
    "awq_w4_g32": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
    "gptq_w4_g32_sym_v1": {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False},
    "gptq_w3_g64_asym_v2_actorder": {"quant_method": "gptq", "bits": 3, "group_size": 64, "sym": False,
                                     "desc_act": True, "checkpoint_format": "gptq_v2"},
    "gptq_w8_perchannel": {"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": True, "desc_act": False},
    "gptq_w2_g32_asym": {"quant_method": "gptq", "bits": 2, "group_size": 32, "sym": False, "desc_act": False},
}


def layer_weights(eng: Engine, deq: dict[str, torch.Tensor]) -> list[tuple[QuantLinear, torch.Tensor]]:
    """(layer, its full dequantized weight [N, K]) for every quantized QuantLinear of the engine."""
    out = []
    for m in eng.model.modules():
        if isinstance(m, QuantLinear) and m.is_quantized:
            out.append((m, torch.cat([deq[f"{p}.weight"] for p in m.shard_prefixes()])))
    return out


def check_engine_against_float(qdir: Path, fdir: Path, deq: dict[str, torch.Tensor], method: str,
                               min_db_bf16: float = 30.0) -> None:
    """fp32: every linear ≥ 40 dB against the dequantized weight (exact up to summation order, except
    per-channel int8, whose op rounds activations to bf16: ~50 dB) and greedy tokens equal the float
    Engine's; bf16: every linear ≥ min_db_bf16."""
    eng = Engine(model_path=str(qdir), max_total_tokens=1024, dtype="float32")
    assert eng.quant_method == method
    layers = layer_weights(eng, deq)
    assert len(layers) == 2 * 4, [m.shard_prefixes() for m, _ in layers]  # qkv, o, gate_up, down x 2
    torch.manual_seed(0)
    for layer, w in layers:
        x = torch.randn(5, layer.in_features)
        assert sqnr_db(x.double() @ w.double().T, layer(x)) >= 40.0, (layer.shard_prefixes(), layer.kernel_desc)
    ref = Engine(model_path=str(fdir), max_total_tokens=1024, dtype="float32")
    got = [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
    want = [o["output_ids"] for o in ref.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
    if any("cpu_int8_weight_only" in m.kernel_desc.split(";")[0] for m, _ in layers):
        # bf16-rounded activations (~50 dB per linear): a random tiny model's near-ties flip late
        assert [g[:6] for g in got] == [w[:6] for w in want]
    else:
        assert got == want
    eng16 = Engine(model_path=str(qdir), max_total_tokens=1024, dtype="bfloat16")
    for layer, w in layer_weights(eng16, deq):
        x = torch.randn(5, layer.in_features)
        y = layer(x.bfloat16()).float()
        assert sqnr_db(x.double() @ w.double().T, y) >= min_db_bf16, (layer.shard_prefixes(), layer.kernel_desc)


@pytest.mark.parametrize("case", list(CASES))
def test_int_checkpoint_through_engine(tiny_models, tmp_path, case):
    qcfg = CASES[case]
    fdir, deq = write_int_checkpoint(tiny_models["llama"][0], tmp_path / "ckpt", qcfg)
    check_engine_against_float(tmp_path / "ckpt", fdir, deq, qcfg["quant_method"])


def test_int4_bf16_runs_the_packed_kernel(tiny_models, tmp_path):
    qcfg = CASES["gptq_w4_g32_sym_v1"]
    write_int_checkpoint(tiny_models["llama"][0], tmp_path / "ckpt", qcfg)
    eng = Engine(model_path=str(tmp_path / "ckpt"), max_total_tokens=1024, dtype="bfloat16")
    kernels = {m.kernel_desc.split()[0] for m in eng.model.modules() if isinstance(m, QuantLinear) and m.is_quantized}
    from quantrt.platforms.xpu import cpu_ext

    want = "cpu_native_int" if cpu_ext.load() else "cpu_int4_packed"   # the native extension goes first
    assert all(want in k for k in kernels), kernels


def _corrupt(ckpt: Path, edit) -> None:
    sd = load_file(str(ckpt / "model.safetensors"))
    edit(sd)
    save_file(sd, str(ckpt / "model.safetensors"))


def _set_qcfg(ckpt: Path, **kw) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"].update(kw)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_bad_int_checkpoints_fail_clearly(tiny_models, tmp_path):
    src = tiny_models["llama"][0]
    ck = tmp_path / "gptq"
    write_int_checkpoint(src, ck, CASES["gptq_w4_g32_sym_v1"])
    _set_qcfg(ck, bits=5)
    with pytest.raises(Exception, match="bits=5 is not supported"):
        Engine(model_path=str(ck), max_total_tokens=1024)
    _set_qcfg(ck, bits=4, group_size=48)
    # a group size that does not divide K is a partial last group (ceil(K/G) groups): tensors with
    # another group count are named with both shapes
    with pytest.raises(Exception, match=r"proj\.(qzeros|scales) has shape \(\d+, \d+\), expected \(\d+, \d+\); "
                                        r"group size 48 does not divide K=(64|128)"):
        Engine(model_path=str(ck), max_total_tokens=1024)
    _set_qcfg(ck, group_size=32)
    name = "model.layers.1.mlp.down_proj.qweight"
    _corrupt(ck, lambda sd: sd.__setitem__(name, sd[name][:-1].contiguous()))
    with pytest.raises(Exception, match=r"model\.layers\.1\.mlp\.down_proj\.qweight has shape \(15, 64\), "
                                        r"expected \(16, 64\)"):
        Engine(model_path=str(ck), max_total_tokens=1024)
    ck = tmp_path / "awq"
    write_int_checkpoint(src, ck, CASES["awq_w4_g32"])
    _corrupt(ck, lambda sd: sd.pop("model.layers.0.self_attn.k_proj.qzeros"))
    with pytest.raises(Exception, match=r"missing tensors: model\.layers\.0\.self_attn\.k_proj\.qzeros"):
        Engine(model_path=str(ck), max_total_tokens=1024)
