"""Quantized KV caches on tiny models: page formats, scales from checkpoints, capacity, bad inputs."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantrt.engine.engine import Engine
from quantrt.engine.kv_pool import KVPool
from quantrt.engine.kv_quant import KVCacheSpec, KVKind, fp4_dequantize, fp4_quantize, resolve_kv_cache_dtype
from quantrt.errors import CheckpointError, ConfigError
from quantrt.layers.attention import PagedAttention

PROMPT = list(range(5, 45))
KV_DTYPES = ["bf16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"]


def _platform(fp8=torch.float8_e4m3fn, dtypes=(torch.float32, torch.bfloat16)):
    return SimpleNamespace(name="fake", fp8_dtype=lambda: fp8, supported_dtypes=lambda: dtypes)


# -- page formats ---------------------------------------------------------------------------
def test_fp4_layout_even_element_low_nibble_and_pow2_scales():
    x = torch.zeros(1, 1, 16)
    x[0, 0, 0], x[0, 0, 1], x[0, 0, 2] = 3.0, -0.5, 12.0      # amax 12 -> scale 2^ceil(log2 2) = 2
    packed, scales = fp4_quantize(x)
    assert packed.shape == (1, 1, 8) and scales.shape == (1, 1)
    assert scales.item() == 127 + 1
    # 3/2 = 1.5 -> index 3; -0.5/2 = -0.25 -> 0 with sign (ties round down) ; 12/2 = 6 -> index 7
    assert packed[0, 0, 0].item() == 3 | (8 << 4)
    assert packed[0, 0, 1].item() == 7
    torch.testing.assert_close(fp4_dequantize(packed, scales)[0, 0, :3], torch.tensor([3.0, -0.0, 12.0]))


def test_fp4_roundtrip_error_is_bounded():
    x = torch.randn(64, 4, 32) * torch.logspace(-3, 3, 64)[:, None, None]
    y = fp4_dequantize(*fp4_quantize(x))
    blocks = x.reshape(64, -1, 16)
    err = (y - x).reshape(64, -1, 16).abs().amax(-1)
    # worst e2m1 step is 2 (between 4 and 6) times a scale <= amax/3: error <= amax/3
    assert bool((err <= blocks.abs().amax(-1) / 3 + 1e-12).all())


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "bf16"])
def test_pool_write_gather_applies_scales(name):
    spec = resolve_kv_cache_dtype(name, torch.float32, _platform())
    pool = KVPool(1, 8, 2, 16, spec, torch.device("cpu"))
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    slots = torch.tensor([5, 1, 6])
    pool.write(0, slots, k, v, k_scale=0.5, v_scale=2.0)
    kk, vv = pool.gather(0, slots, k_scale=0.5, v_scale=2.0)
    if spec.kind is KVKind.FP8:
        assert pool.k[0].dtype == torch.uint8
        torch.testing.assert_close(kk, (k / 0.5).to(spec.dtype).float() * 0.5)
        torch.testing.assert_close(vv, (v / 2.0).to(spec.dtype).float() * 2.0)
    elif spec.kind is KVKind.FP4:
        assert pool.k[0].shape == (8, 2, 8) and pool.k_sc[0].shape == (8, 2)
        torch.testing.assert_close(kk, fp4_dequantize(*fp4_quantize(k / 0.5)) * 0.5)
    else:
        torch.testing.assert_close(kk, k.to(torch.bfloat16))


# -- resolution, capacity --------------------------------------------------------------------
def test_bytes_per_token_ratios():
    shape = (30, 3, 64)
    bf16 = KVCacheSpec("bf16", KVKind.PLAIN, torch.bfloat16).bytes_per_token(*shape)
    assert bf16 == 2 * 30 * 3 * 64 * 2
    for name, ratio in (("fp8_e4m3", 2.0), ("fp8_e5m2", 2.0), ("fp4_e2m1", 32 / 9)):
        spec = resolve_kv_cache_dtype(name, torch.float32, _platform())
        assert bf16 / spec.bytes_per_token(*shape) == pytest.approx(ratio)


def test_rocm_fnuz_and_modelopt_auto():
    fnuz = _platform(fp8=torch.float8_e4m3fnuz)
    assert resolve_kv_cache_dtype("fp8_e5m2", torch.bfloat16, fnuz).dtype == torch.float8_e4m3fnuz
    auto = resolve_kv_cache_dtype("auto", torch.bfloat16, _platform(), {"kv_cache_quant_algo": "FP8"})
    assert (auto.kind, auto.dtype) == (KVKind.FP8, torch.float8_e4m3fn)
    assert resolve_kv_cache_dtype("auto", torch.float16, _platform()).dtype == torch.float16


def test_unsupported_combinations_fail_clearly():
    with pytest.raises(ConfigError, match="does not support bfloat16"):
        resolve_kv_cache_dtype("bf16", torch.float16, _platform(dtypes=(torch.float16,)))
    with pytest.raises(ConfigError, match="fp4_e2m1 needs an even head_dim"):
        KVCacheSpec("fp4_e2m1", KVKind.FP4, None).check_shape(1, 24)
    with pytest.raises(ConfigError, match="unknown --kv-cache-dtype 'int8'"):
        resolve_kv_cache_dtype("int8", torch.float32, _platform())


def test_engine_capacity_follows_real_bytes(tiny_models):
    """Same memory budget: fp8 holds 2x and fp4 32/9x the tokens of bf16 (up to page rounding)."""
    from quantrt.platform import current_platform

    _, total = current_platform(None).memory_info()
    frac = 8 * 2**20 / total                      # ~8 MiB for weights (~0.4 MiB) + KV
    tokens = {}
    for kv in ("bf16", "fp8_e4m3", "fp4_e2m1"):
        e = Engine(model_path=str(tiny_models["llama"][0]), kv_cache_dtype=kv, mem_fraction_static=frac,
                   max_running_requests=100_000)
        info = e.kv_info()
        tokens[kv] = info["max_total_tokens"]
        assert info["kv_cache_dtype"] == kv and info["pool_bytes"] <= frac * total
        assert info["pool_bytes"] == pytest.approx(info["bytes_per_token"] * tokens[kv], rel=1e-6)
    assert tokens["fp8_e4m3"] / tokens["bf16"] == pytest.approx(2.0, rel=1e-3)
    assert tokens["fp4_e2m1"] / tokens["bf16"] == pytest.approx(32 / 9, rel=1e-3)


# -- end to end on tiny models -----------------------------------------------------------------
@pytest.mark.parametrize("kv", KV_DTYPES)
def test_quantized_kv_stays_close_to_transformers(kv, tiny_models):
    """Prompt logprobs (prefill reads its own quantized K/V) and a decode run on gemma3 (sliding window,
    q/k norms) stay near HF's fp32 values; the error grows with coarser KV formats.
    Measured max |dlogprob| over 39 positions: bf16 0.0043, e4m3 0.072, e5m2 0.163, fp4 0.271."""
    hf = tiny_models["gemma3"][1]
    eng = Engine(model_path=str(tiny_models["gemma3"][0]), kv_cache_dtype=kv, max_total_tokens=1024, page_size=4)
    out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
                       return_logprob=True, logprob_start_len=0)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0].double(), -1)
    ours = torch.tensor([lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]], dtype=torch.float64)
    theirs = ref[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    tol = {"bf16": 0.01, "fp8_e4m3": 0.15, "fp8_e5m2": 0.3, "fp4_e2m1": 0.5}[kv]
    err = (ours - theirs).abs().max().item()
    assert err < tol
    assert len(out["output_ids"]) == 8


# -- scales from checkpoints -------------------------------------------------------------------
@pytest.fixture
def ckpt(tiny_models, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_models["llama"][0], dst)
    return dst


def _with(ckpt, extra: dict[str, torch.Tensor]):
    sd = load_file(str(ckpt / "model.safetensors"))
    sd.update(extra)
    save_file(sd, str(ckpt / "model.safetensors"))


def _scales(eng) -> list[tuple[float, float]]:
    return [(m.k_scale, m.v_scale) for m in eng.model.modules() if isinstance(m, PagedAttention)]


def test_every_scale_name_lands_in_attention(ckpt):
    a, b = "model.layers.0.self_attn", "model.layers.1.self_attn"
    _with(ckpt, {f"{a}.k_proj.k_scale": torch.tensor(0.5), f"{a}.v_proj.output_scale": torch.tensor([0.25]),
                 f"{a}.attn.q_scale": torch.tensor(1.0), f"{b}.kv_scale": torch.tensor(-1.0)})
    eng = Engine(model_path=str(ckpt), kv_cache_dtype="fp8_e4m3", max_total_tokens=256)
    assert _scales(eng) == [(0.5, 0.25), (1.0, 1.0)]
    assert eng.kv_info()["kv_scales_not_one"] == 2
    assert len(eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 4})["output_ids"]) >= 1


@pytest.mark.parametrize("name, value, match", [
    ("model.layers.0.self_attn.k_scale", torch.tensor([1.0, 2.0]), "must be one float"),
    ("model.layers.0.self_attn.attn.v_scale", torch.tensor(0.0), "finite positive"),
    ("model.layers.0.self_attn.k_proj.output_scale", torch.tensor(float("nan")), "finite positive"),
    ("model.layers.0.self_attn.k_scale", torch.tensor(3, dtype=torch.int32), "must be one float"),
    ("model.layers.0.self_attn.x_scale", torch.tensor(1.0), "unexpected tensor"),
])
def test_bad_scale_tensors_fail_clearly(ckpt, name, value, match):
    _with(ckpt, {name: value})
    with pytest.raises(CheckpointError, match=match):
        Engine(model_path=str(ckpt), kv_cache_dtype="fp8_e4m3", max_total_tokens=256)


def test_conflicting_duplicate_scales(ckpt):
    a = "model.layers.0.self_attn"
    _with(ckpt, {f"{a}.kv_scale": torch.tensor(0.5), f"{a}.k_proj.k_scale": torch.tensor(0.25)})
    with pytest.raises(CheckpointError, match="conflicts with"):
        Engine(model_path=str(ckpt), kv_cache_dtype="fp8_e4m3", max_total_tokens=256)
