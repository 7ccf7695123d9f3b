"""Decode graphs: bucketing, padding and fallback rules on CPU (an eager stand-in for the CUDA graph
backend runs the very runner code), and on the GPU (`-m accelerator`) greedy tokens with graphs ==
without graphs for bf16, fp8, int4 (AWQ, GPTQ), int8dq and an fp8 KV cache."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from quantrt import Engine
from quantrt.platform.interface import DecodeInputs, DeviceCapability
from quantrt.platforms.cuda.graphs import (
    DecodeGraphRunner,
    capture_sizes,
    len_bucket,
    pack_inputs,
    padded_batch,
)
from quantrt.platforms.cuda.platform import CudaPlatform

PROMPTS = [[5, 17, 42, 9, 100, 3, 77], [8, 8, 30], [200, 11, 64, 65, 66, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
GREEDY = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}


class EagerBackend:
    """Stands in for torch.cuda graphs on CPU: `capture` runs fn once and keeps its output as the static
    tensor; `replay` recomputes into it. `fail` makes capture raise like a host sync during capture."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.captures = fail, 0

    def capture(self, fn: Callable[[], torch.Tensor]):
        out = fn()
        if self.fail:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        self.captures += 1
        return (fn, out), out

    def replay(self, handle) -> None:
        fn, out = handle
        out.copy_(fn())


# --------------------------------------------------------------------- pure rules
def test_capture_sizes_and_padding() -> None:
    assert capture_sizes(1) == (1,)
    assert capture_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert capture_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    sizes = capture_sizes(48)
    assert [padded_batch(sizes, n) for n in (1, 3, 5, 17, 33, 48, 49)] == [1, 4, 8, 32, 48, 48, None]
    with pytest.raises(ValueError, match="--cuda-graph-max-bs must be >= 1"):
        capture_sizes(0)


def test_length_buckets() -> None:
    got = {n: len_bucket(n, 4096) for n in (1, 64, 65, 130, 511, 513, 1000, 4000, 4096)}
    assert got == {1: 64, 64: 64, 65: 128, 130: 192, 511: 512, 513: 640, 1000: 1024, 4000: 4096, 4096: 4096}
    assert len_bucket(4097, 4096) is None
    assert len_bucket(100, 100) == 128          # capped at max_len rounded up to 64
    for n in range(1, 3000, 7):                   # padding stays under max(64, n / 4)
        b = len_bucket(n, 1 << 20)
        assert n <= b < n + max(64, n / 4)
    with pytest.raises(ValueError, match="KV length must be >= 1"):
        len_bucket(0, 10)


def test_pack_inputs_repeats_row_zero_and_zero_pads() -> None:
    d = DecodeInputs(torch.tensor([7, 8]), torch.tensor([3, 1]), torch.tensor([13, 21]), torch.tensor([4, 2]),
                     torch.tensor([[10, 11, 12, 13], [20, 21, 0, 0]]))
    host = pack_inputs(d, 4, 6)
    assert host.tolist() == [[7, 3, 13, 4, 10, 11, 12, 13, 0, 0], [8, 1, 21, 2, 20, 21, 0, 0, 0, 0],
                             [7, 3, 13, 4, 10, 11, 12, 13, 0, 0], [7, 3, 13, 4, 10, 11, 12, 13, 0, 0]]
    with pytest.raises(ValueError, match="batch 2 x length 4 does not fit the graph's 1 x 6"):
        pack_inputs(d, 1, 6)


def test_graph_flags() -> None:
    from quantrt.errors import ConfigError
    from quantrt.server_args import ServerArgs

    args = ServerArgs.from_cli(["--model-path", "/m", "--cuda-graph-max-bs", "32"])
    assert args.cuda_graph_max_bs == 32 and not args.disable_cuda_graph
    assert ServerArgs.from_cli(["--model-path", "/m", "--disable-cuda-graph"]).disable_cuda_graph
    with pytest.raises(ConfigError, match="--cuda-graph-max-bs must be >= 1, got 0"):
        ServerArgs(model_path="/m", cuda_graph_max_bs=0)


def test_cuda_platform_offers_the_runner_without_a_gpu() -> None:
    plat = CudaPlatform(capability=DeviceCapability(9, 0), device_name="fake H100")
    assert plat.graph_runner() is DecodeGraphRunner


@pytest.mark.parametrize("dtype, shape", [(torch.bfloat16, (5, 64)), (torch.float16, (3, 4, 100)),
                                          (torch.float32, (2, 48))])
def test_triton_rms_norm_matches_the_torch_rmsnorm(dtype, shape) -> None:
    """The CUDA platform's fused RMSNorm (natively on a GPU, under TRITON_INTERPRET on CPU) vs RMSNorm's
    own math, and both vs float64."""
    from quantrt.layers.norm import RMSNorm
    from quantrt.platforms.cuda.layer_ops import triton_rms_norm

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype).to(dev)
    norm = RMSNorm(shape[-1], 1e-5)
    norm.weight.data = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dev)
    norm.finish_loading(dtype)
    ref = norm(x)
    got = triton_rms_norm(x, norm._scale, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    x64 = x.double()
    exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.data.double()
    tol = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    assert (got.double() - exact).abs().max() <= tol * exact.abs().max()
    assert (got.double() - ref.double()).abs().max() <= tol * exact.abs().max()
    if dev == "cuda" and dtype != torch.float32:  # the interpreter truncates to bf16; the GPU rounds like torch
        assert (got != ref).float().mean() < 0.02    # the same rounding almost everywhere


def test_cuda_platform_norm_op_is_the_triton_kernel() -> None:
    from quantrt.platforms.cuda.layer_ops import triton_rms_norm

    assert CudaPlatform(capability=DeviceCapability(9, 0), device_name="fake H100").rms_norm_op() is triton_rms_norm


# --------------------------------------------------------------------- the runner in the engine
def _engine(tiny_models, arch: str = "llama", **kw) -> Engine:
    return Engine(model_path=str(tiny_models[arch][0]), max_total_tokens=2048, page_size=4, random_seed=0,
                  device="cpu", **kw)


def _generate(eng: Engine) -> tuple[list[list[int]], list[list[float]]]:
    out = eng.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    return ([o["output_ids"] for o in out],
            [[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in out])


@pytest.mark.parametrize("kv", ["auto", "fp8_e4m3"])
def test_padded_graph_steps_match_eager(tiny_models, kv: str) -> None:
    eng = _engine(tiny_models, kv_cache_dtype=kv)
    runner = eng.scheduler.runner
    assert runner.graph_status().startswith("off: cpu has no graph runner")
    ref_ids, ref_lp = _generate(eng)
    backend = EagerBackend()
    assert runner.enable_graphs(DecodeGraphRunner, 4, 512, backend=backend)
    ids, lp = _generate(eng)
    assert ids == ref_ids
    assert torch.allclose(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-4, rtol=0)
    g = runner.graphs
    # 3 sequences pad to 4; lengths 8..41 fall in the 64 bucket; the 3 prefills ran eagerly
    assert set(g.graphs) == {(4, 64)} and backend.captures == 1
    assert g.replays == GREEDY["max_new_tokens"] - 1
    assert runner.graph_status() == "on (batch sizes 1, 2, 4; KV length up to 512)"


def test_batches_and_lengths_past_the_limits_run_eagerly(tiny_models) -> None:
    eng = _engine(tiny_models)
    ref_ids, _ = _generate(eng)
    runner = eng.scheduler.runner
    runner.enable_graphs(DecodeGraphRunner, 2, 512, backend=EagerBackend())   # batch 3 > max_bs 2
    assert _generate(eng)[0] == ref_ids and runner.graphs.replays == 0
    single = eng.generate(input_ids=PROMPTS[2], sampling_params={**GREEDY, "max_new_tokens": 60})["output_ids"]
    runner.enable_graphs(DecodeGraphRunner, 4, 64, backend=EagerBackend())
    again = eng.generate(input_ids=PROMPTS[2], sampling_params={**GREEDY, "max_new_tokens": 60})["output_ids"]
    assert again == single
    # the prefix cache holds 16 of the 17 prompt tokens, so the last one runs as a one-token step too:
    # KV lengths 17..64 replay the graph, 65..76 run eagerly
    assert runner.graphs.replays == 64 - 16 and set(runner.graphs.graphs) == {(1, 64)}


def test_failed_capture_disables_graphs_and_decodes_eagerly(tiny_models) -> None:
    eng = _engine(tiny_models)
    ref_ids, _ = _generate(eng)
    runner = eng.scheduler.runner
    runner.enable_graphs(DecodeGraphRunner, 4, 512, backend=EagerBackend(fail=True))
    assert _generate(eng)[0] == ref_ids
    assert runner.graphs.disabled.startswith("capture of batch 4 x KV length 64 failed: RuntimeError: CUDA error")
    assert runner.graph_status().startswith("off: capture of batch 4")


def test_moe_models_and_the_flag_turn_graphs_off(tiny_models) -> None:
    eng = _engine(tiny_models, "qwen3_moe")
    runner = eng.scheduler.runner
    assert not runner.enable_graphs(DecodeGraphRunner, 4, 512, backend=EagerBackend())
    assert runner.graph_status().startswith("off: MoE layer model.layers.0.mlp runs the grouped MoE kernel")
    plat = CudaPlatform(capability=DeviceCapability(9, 0), device_name="fake H100")
    runner.configure_graphs(plat, True, None, 64, 512)
    assert runner.graph_status() == "off: --disable-cuda-graph"


# --------------------------------------------------------------------- on the GPU
def _write_int(tiny_models, tmp_path, case: str):
    from tests.test_int_engine import CASES, write_int_checkpoint

    dst = tmp_path / case
    write_int_checkpoint(tiny_models["llama"][0], dst, CASES[case])
    return str(dst)


GPU_CASES = {
    "bf16": {},
    "fp8": {"quantization": "fp8"},
    "awq_w4_g32": "awq_w4_g32",
    "gptq_w4_g32_sym_v1": "gptq_w4_g32_sym_v1",
    "int8dq": {"torchao_config": "int8dq"},
    "fp8_kv": {"kv_cache_dtype": "fp8_e4m3"},
    "fp4_kv": {"kv_cache_dtype": "fp4_e2m1"},
}


@pytest.mark.accelerator
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_cuda_graph_tokens_equal_eager(tiny_models, tmp_path, case: str) -> None:
    spec = GPU_CASES[case]
    path, kw = (_write_int(tiny_models, tmp_path, spec), {}) if isinstance(spec, str) \
        else (str(tiny_models["llama"][0]), spec)
    prompts = PROMPTS + [[i + 1, 2 * i + 3, 50] for i in range(5)]          # 8 sequences
    outs = {}
    for graphs in (False, True):
        eng = Engine(model_path=path, dtype="bfloat16", max_total_tokens=4096, page_size=16, random_seed=0,
                     disable_cuda_graph=not graphs, **kw)
        runner = eng.scheduler.runner
        outs[graphs] = [eng.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in prompts[:2]]
        outs[graphs] += [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=GREEDY)]
        outs[graphs] += [o["output_ids"] for o in eng.generate(input_ids=prompts[:3], sampling_params=GREEDY)]
        if graphs:
            assert runner.graphs.disabled is None, runner.graphs.disabled
            assert {1, 4, 8} <= {bs for bs, _ in runner.graphs.graphs}
            assert runner.graphs.replays >= 4 * (GREEDY["max_new_tokens"] - 1)
        else:
            assert runner.graphs is None
        eng.shutdown()
    assert outs[True] == outs[False]
