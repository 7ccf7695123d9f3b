"""A quantized model occupies its quantized size: after loading, the distinct tensor storages reachable
from engine.model (modules, parameters, buffers, kernel objects and what they hold) add up to the size
computed from the layer shapes alone, with no canonical (unpacked) weight kept beside the repacked one.

Expected sizes (bf16 compute, CPU; `native_*` when the native extension serves the linears): int4 g32
(cpu_int4_packed) N*K/2 codes + bf16 scale and zero per
group of 32; int8 weight-only N*K codes + a bf16 scale per row; GGUF Q4_0 is int4 g32 after loading;
fp8 on CPU is emulated (dequantized once to fp32, no fp8 matmul on this CPU), so it must hold exactly
N*K fp32 and nothing else.
"""

from __future__ import annotations

import sys
import types

import gguf
import pytest
import torch

from quantrt.engine.engine import Engine, _model_bytes
from quantrt.layers.linear import QuantLinear
from quantrt.platforms.xpu import cpu_ext
from tests import test_gguf_loader
from tests.test_int_engine import CASES, write_int_checkpoint


def reachable_bytes(root: object) -> int:
    """Independent walk: every storage reachable from `root`, counted once by (device, data_ptr)."""
    seen, storages = set(), {}

    def visit(o):
        if id(o) in seen or isinstance(o, (str, int, float, bool, type, types.ModuleType, torch.dtype)):
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            key = ("mkldnn", id(o)) if o.is_mkldnn else (o.device, o.untyped_storage().data_ptr())
            storages[key] = o.numel() * o.element_size() if o.is_mkldnn else o.untyped_storage().nbytes()
        elif isinstance(o, (list, tuple, set)):
            for v in o:
                visit(v)
        elif isinstance(o, dict):
            for v in o.values():
                visit(v)
        elif isinstance(o, types.FunctionType):
            for c in o.__closure__ or ():
                visit(c.cell_contents)
        elif hasattr(o, "__dict__"):
            for v in vars(o).values():
                visit(v)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10000))
    try:
        visit(root)
    finally:
        sys.setrecursionlimit(limit)
    return sum(storages.values())


def linear_shapes(eng: Engine) -> dict[str, list[tuple[int, int]]]:
    """module name -> (N, K) of each of its kernels' canonical weights, for every quantized linear."""
    return {name: [i.shape for i in m.weight_infos] for name, m in eng.model.named_modules()
            if isinstance(m, QuantLinear) and m.is_quantized}


def int4_g32(n: int, k: int) -> int:
    return n * k // 2 + 2 * n * (k // 32) * 2            # packed codes + bf16 scale and zero per group


def int8_channel(n: int, k: int) -> int:
    return n * k + n * 2                                  # int8 codes + bf16 scale per row


def fp32_emulated(n: int, k: int) -> int:
    return n * k * 4


# cpu_native_int (the native extension, ahead of torch's packed ops when it loads): per 32-block of a row
def native_int4_zero(n: int, k: int) -> int:
    return n * k // 2 + n * (k // 32) * (2 + 1)           # packed codes + fp16 scale + uint8 zero point


def native_int4_offset(n: int, k: int) -> int:
    return n * k // 2 + n * (k // 32) * (2 + 4)           # packed codes + fp16 scale + fp32 min


def native_int8_channel(n: int, k: int) -> int:
    return n * k + n * (k // 32) * 4                      # int8 codes + the row's fp32 scale per 32-block


NATIVE = cpu_ext.load()


def check_size(eng: Engine, ref: Engine, packed) -> int:
    """Assert eng's bytes = ref's (bf16) bytes with each linear's bf16 [N, K] replaced by packed(N, K)."""
    by_name = linear_shapes(eng)
    dense = dict(ref.model.named_modules())
    assert by_name and all(not dense[name].is_quantized and sum(n for n, _ in s) == dense[name].out_features
                           for name, s in by_name.items())
    shapes = [nk for s in by_name.values() for nk in s]
    got, ref_bytes = reachable_bytes(eng.model), reachable_bytes(ref.model)
    want = ref_bytes - sum(n * k * 2 for n, k in shapes) + sum(packed(n, k) for n, k in shapes)
    assert abs(got - want) <= 0.002 * want, (got, want, ref_bytes)  # exact today; slack for alignment
    assert _model_bytes(eng.model) == got                 # the KV budget's own figure agrees
    return got


@pytest.fixture(scope="module")
def llama_bf16(tiny_models):
    return Engine(model_path=str(tiny_models["llama"][0]), dtype="bfloat16", max_total_tokens=256)


def _kernels(eng: Engine) -> set[str]:
    return {m.kernel_desc.split()[0] for m in eng.model.modules() if isinstance(m, QuantLinear) and m.is_quantized}


def test_gptq_int4_g32_holds_its_packed_size(tiny_models, tmp_path, llama_bf16):
    write_int_checkpoint(tiny_models["llama"][0], tmp_path / "gptq", CASES["gptq_w4_g32_sym_v1"])
    eng = Engine(model_path=str(tmp_path / "gptq"), dtype="bfloat16", max_total_tokens=256)
    assert _kernels(eng) == {"cpu_native_int" if NATIVE else "cpu_int4_packed"}
    assert check_size(eng, llama_bf16, int4_g32) < reachable_bytes(llama_bf16.model)   # native: fp16 min -8*s


@pytest.mark.parametrize("config,packed,kernel", [
    ("int4wo-32", *((native_int4_offset, "cpu_native_int") if NATIVE else (int4_g32, "cpu_int4_packed"))),
    ("int8wo", *((native_int8_channel, "cpu_native_int") if NATIVE else (int8_channel, "cpu_int8_weight_only")))])
def test_torchao_holds_its_packed_size(tiny_models, llama_bf16, config, packed, kernel):
    eng = Engine(model_path=str(tiny_models["llama"][0]), dtype="bfloat16", torchao_config=config,
                 max_total_tokens=256)
    assert _kernels(eng) == {kernel}
    assert check_size(eng, llama_bf16, packed) < reachable_bytes(llama_bf16.model)


def test_fp8_cpu_emulation_holds_only_its_fp32_weight(tiny_models, llama_bf16):
    eng = Engine(model_path=str(tiny_models["llama"][0]), dtype="bfloat16", quantization="fp8",
                 max_total_tokens=256)
    assert _kernels(eng) == {"cpu_fp8_emulated"}
    check_size(eng, llama_bf16, fp32_emulated)           # no fp8 copy of the canonical weight on top


def test_gguf_q4_0_holds_its_packed_size(tiny_models, tmp_path, monkeypatch):
    cfg, _ = test_gguf_loader._TINY_ARCHS["qwen2"]
    paths = {}
    for qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.BF16):
        monkeypatch.setitem(test_gguf_loader._TINY_ARCHS, "qwen2", (cfg, qtype))
        paths[qtype.name] = tmp_path / f"tiny-{qtype.name}.gguf"
        test_gguf_loader.write_tiny_gguf(paths[qtype.name], "qwen2")
    tok = str(tiny_models["llama"][0])  # the test GGUF carries no tokenizer
    eng = Engine(model_path=str(paths["Q4_0"]), tokenizer_path=tok, dtype="bfloat16", max_total_tokens=256)
    ref = Engine(model_path=str(paths["BF16"]), tokenizer_path=tok, dtype="bfloat16", max_total_tokens=256)
    assert _kernels(eng) == {"cpu_native_int" if NATIVE else "cpu_int4_packed"} and not _kernels(ref)
    assert check_size(eng, ref, native_int4_zero if NATIVE else int4_g32) < reachable_bytes(ref.model)


def _expert_shapes(eng: Engine) -> list[tuple[int, int]]:
    """(N, K) of every routed expert's gate+up [2I, H] and down [H, I] GEMM."""
    from quantrt.layers.moe.layer import FusedMoE

    moes = [m for m in eng.model.modules() if isinstance(m, FusedMoE)]
    return [s for m in moes for _ in range(m.routing.num_experts) for s in ((2 * m.inter, m.hidden), (m.hidden, m.inter))]


@pytest.mark.parametrize("config,packed,kernel,linear", [
    ("int4wo-32", int4_g32, "cpu_moe_int4_packed", native_int4_offset if NATIVE else int4_g32),
    ("int8wo", int8_channel, "cpu_moe_int8_packed", native_int8_channel if NATIVE else int8_channel)])
def test_moe_holds_its_packed_size(tiny_models, monkeypatch, config, packed, kernel, linear):
    from quantrt.layers.moe.layer import FusedMoE

    monkeypatch.setattr(FusedMoE, "keep_canonical", False)  # production: no canonical experts after loading
    path = str(tiny_models["qwen3_moe"][0])
    ref = Engine(model_path=path, dtype="bfloat16", max_total_tokens=256)
    eng = Engine(model_path=path, dtype="bfloat16", torchao_config=config, max_total_tokens=256)
    moes = [m for m in eng.model.modules() if isinstance(m, FusedMoE)]
    assert moes and {m.impl for m in moes} == {kernel} and all(m.qexperts is None for m in moes)
    experts = _expert_shapes(eng)
    assert experts == _expert_shapes(ref)
    shapes = [nk for s in linear_shapes(eng).values() for nk in s]
    ref_bytes = reachable_bytes(ref.model)
    want = (ref_bytes - sum(2 * n * k for n, k in shapes + experts) + sum(linear(n, k) for n, k in shapes)
            + sum(packed(n, k) for n, k in experts))                     # attention linears: linear kernels
    got = reachable_bytes(eng.model)
    assert abs(got - want) <= 0.002 * want and got < ref_bytes, (got, want, ref_bytes)
    assert _model_bytes(eng.model) == got
