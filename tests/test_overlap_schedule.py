"""The overlap schedule: greedy decode step N+1 is queued before step N's tokens are read.

On CPU the decode-graph runner runs with an eager stand-in for CUDA graphs (the very runner and
scheduler code, with host buffers instead of pinned ones), and every case compares against the same
engine with `--disable-overlap-schedule`: tokens, finish reasons, pages given back, and the prefix
cache the overlapped run leaves behind. On the GPU (`-m accelerator`) the queued steps really overlap."""

from __future__ import annotations

import pytest
import torch

from quantrt import Engine
from quantrt.engine.sampling_params import SamplingParams
from quantrt.platforms.cuda.graphs import DecodeGraphRunner
from quantrt.server_args import ServerArgs
from tests.test_cuda_graphs import EagerBackend

PROMPTS = [[5, 17, 42, 9, 100, 3, 77], [8, 8, 30], [200, 11, 64, 65, 66, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
           [31, 41, 59, 26, 53]]


def _engine(tiny_models, overlap: bool, **kw) -> Engine:
    eng = Engine(model_path=str(tiny_models["llama"][0]), max_total_tokens=kw.pop("max_total_tokens", 2048),
                 page_size=4, random_seed=0, device="cpu", disable_overlap_schedule=not overlap, **kw)
    runner = eng.scheduler.runner
    assert runner.enable_graphs(DecodeGraphRunner, 4, 512, backend=EagerBackend())
    eng.scheduler.overlap = overlap and runner.can_overlap()   # CPU has no graph runner at start-up
    return eng


def _params(n: int, **kw) -> list[dict]:
    """Greedy, no EOS stop, a different length limit per request (they leave the batch one by one)."""
    return [{"max_new_tokens": 9 + 5 * i, "temperature": 0, "ignore_eos": True, **kw} for i in range(n)]


def _outputs(eng: Engine, params, prompts=PROMPTS) -> list[tuple[list[int], dict]]:
    out = eng.generate(input_ids=prompts, sampling_params=params)
    return [(o["output_ids"], o["meta_info"]["finish_reason"]) for o in out]


def _no_pages_held(eng: Engine) -> bool:
    a = eng.allocator
    return a.available() == a.num_pages and not eng.scheduler.running and not eng.scheduler.waiting


def test_overlapped_tokens_equal_the_synchronous_ones(tiny_models) -> None:
    sync, ovl = _engine(tiny_models, False), _engine(tiny_models, True)
    ref = _outputs(sync, _params(4))
    got = _outputs(ovl, _params(4))
    assert got == ref
    assert [len(ids) for ids, _ in got] == [9, 14, 19, 24]
    g = ovl.scheduler.runner.graphs
    # every decode step after the first of each batch was queued ahead: 23 graph steps, all through launch_greedy
    assert g._launches == g.replays == 23 and sync.scheduler.runner.graphs._launches == 0
    assert ovl.scheduler._queued is None and _no_pages_held(ovl)
    # the prefix cache the overlapped run left holds the right K/V: a second run reuses it, same tokens
    assert _outputs(ovl, _params(4)) == ref
    assert ovl.generate(input_ids=PROMPTS[2], sampling_params=_params(1)[0])["meta_info"]["cached_tokens"] == 16


def test_a_stop_token_mid_batch_drops_one_queued_row(tiny_models) -> None:
    """A request that stops on a token (not by length) is in the step queued after it; that row is dropped."""
    sync, ovl = _engine(tiny_models, False), _engine(tiny_models, True)
    free = _outputs(sync, _params(4))
    stop_tok = free[1][0][4]                       # request 1 stops at its 5th token (or earlier, if repeated)
    params = _params(4)
    params[1]["stop_token_ids"] = [stop_tok]
    ref = _outputs(sync, params)
    assert ref[1][1] == {"type": "stop", "matched": stop_tok} and len(ref[1][0]) <= 5
    assert _outputs(ovl, params) == ref
    assert _no_pages_held(ovl)
    # a stop on the last running request leaves one step queued; it lands even after the graphs go away
    solo = [dict(params[1], max_new_tokens=30)]
    ref_solo = _outputs(sync, solo, PROMPTS[1:2])
    assert _outputs(ovl, solo, PROMPTS[1:2]) == ref_solo and ovl.scheduler._queued is not None
    ovl.scheduler.runner.configure_graphs(None, True, None, 4, 512)        # --disable-cuda-graph
    assert _outputs(ovl, _params(2), PROMPTS[:2]) == _outputs(sync, _params(2), PROMPTS[:2])
    assert ovl.scheduler._queued is None and _no_pages_held(ovl)


def test_the_schedule_drains_for_a_new_request_and_for_aborts(tiny_models) -> None:
    sync, ovl = _engine(tiny_models, False), _engine(tiny_models, True)
    p = _params(3)
    ref = {i: _outputs(sync, [p[i]], [PROMPTS[i]])[0] for i in range(3)}
    sched = ovl.scheduler
    reqs, _ = ovl._make_requests(None, p[:2], PROMPTS[:2], False, None, None)
    for r in reqs:
        sched.add(r)
    for _ in range(4):                             # prefill + 3 decode steps: one queued at any time
        sched.step()
    assert sched._queued is not None
    late, _ = ovl._make_requests(None, p[2], PROMPTS[2], False, None, None)
    sched.add(late[0])
    sched.step()                                   # lands the queued step, queues nothing: prefill is next
    assert sched._queued is None and sched.waiting
    sched.step()                                   # the prefill
    assert late[0] in sched.running
    sched.step()
    sched.abort(reqs[0].rid)                       # aborted with a step queued: its row is dropped on landing
    assert reqs[0].finish_reason["type"] == "abort"
    n_aborted = len(reqs[0].output_ids)
    while sched.has_work() or sched._queued is not None:
        sched.step()
    assert (reqs[1].output_ids, reqs[1].finish_reason) == ref[1]
    assert (late[0].output_ids, late[0].finish_reason) == ref[2]
    assert len(reqs[0].output_ids) == n_aborted and reqs[0].output_ids == ref[0][0][:n_aborted]
    assert _no_pages_held(ovl)


def test_page_shortage_drains_to_the_synchronous_path(tiny_models) -> None:
    """40 KV tokens for 4 growing sequences: queued steps stop where pages run short; preemption and
    recompute happen on the synchronous path and give the same tokens."""
    sync = _engine(tiny_models, False, max_total_tokens=40, max_running_requests=4)
    ovl = _engine(tiny_models, True, max_total_tokens=40, max_running_requests=4)
    params = [{"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}] * 4
    prompts = [pr[:5] for pr in PROMPTS]
    ref = _outputs(sync, params, prompts)
    assert _outputs(ovl, params, prompts) == ref
    assert ovl.scheduler.runner.graphs._launches > 0 and _no_pages_held(ovl)


@pytest.mark.parametrize("extra", [{"temperature": 0.7, "seed": 3}, {"repetition_penalty": 1.2}, "logprobs"])
def test_sampled_penalized_or_logprob_batches_run_synchronously(tiny_models, extra) -> None:
    sync, ovl = _engine(tiny_models, False), _engine(tiny_models, True)
    params = _params(2)
    lp = extra == "logprobs"
    if not lp:
        params[1].update(extra)
    outs = [[(o["output_ids"], o["meta_info"].get("output_token_logprobs"))
             for o in eng.generate(input_ids=PROMPTS[:2], sampling_params=params, return_logprob=[False, lp])]
            for eng in (sync, ovl)]
    assert outs[1] == outs[0]
    assert ovl.scheduler.runner.graphs._launches == 0          # one such request keeps the batch synchronous


def test_streaming_under_the_overlap_schedule(tiny_models) -> None:
    ovl = _engine(tiny_models, True)
    ref = _outputs(_engine(tiny_models, False), _params(2), PROMPTS[:2])
    seen: dict[int, list[list[int]]] = {0: [], 1: []}
    for chunk in ovl.generate(input_ids=PROMPTS[:2], sampling_params=_params(2), stream=True):
        seen[chunk["index"]].append(chunk["output_ids"])
    for i in (0, 1):                               # one token per chunk, in order, ending with the full output
        assert [len(x) for x in seen[i]] == list(range(1, len(ref[i][0]) + 1))
        assert seen[i][-1] == ref[i][0]


def test_flag_and_status(tiny_models) -> None:
    assert ServerArgs.from_cli(["--model-path", "/m", "--disable-overlap-schedule"]).disable_overlap_schedule
    assert not ServerArgs.from_cli(["--model-path", "/m"]).disable_overlap_schedule
    eng = Engine(model_path=str(tiny_models["llama"][0]), max_total_tokens=256, device="cpu")
    assert eng.overlap_status() == "off: needs decode graphs (off: cpu has no graph runner)"
    assert not eng.scheduler.overlap
    off = Engine(model_path=str(tiny_models["llama"][0]), max_total_tokens=256, device="cpu",
                 disable_overlap_schedule=True)
    assert off.overlap_status() == "off: --disable-overlap-schedule"
    on = _engine(tiny_models, True)
    assert on.overlap_status() == "on (greedy decode steps without penalties or logprobs)"
    assert SamplingParams.from_dict({"temperature": 0}).greedy


# --------------------------------------------------------------------- on the GPU
@pytest.mark.accelerator
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant", [None, "fp8"])
def test_cuda_overlap_tokens_equal_synchronous(tiny_models, quant) -> None:
    """Real CUDA graphs, pinned buffers and events: queued steps give the synchronous tokens, also when
    requests stop on a token, leave by length one by one, or a new batch arrives."""
    outs, launches = {}, {}
    prompts = PROMPTS + [[i + 1, 2 * i + 3, 50] for i in range(4)]
    for overlap in (False, True):
        eng = Engine(model_path=str(tiny_models["llama"][0]), dtype="bfloat16", max_total_tokens=4096,
                     page_size=16, random_seed=0, quantization=quant, disable_overlap_schedule=not overlap)
        assert eng.scheduler.overlap == overlap, eng.overlap_status()
        free = _outputs(eng, _params(8), prompts)
        params = _params(8)
        params[2]["stop_token_ids"] = [free[2][0][6]]
        outs[overlap] = [free, _outputs(eng, params, prompts), _outputs(eng, _params(3), prompts[:3])]
        launches[overlap] = eng.scheduler.runner.graphs._launches
        assert _no_pages_held(eng)
        eng.shutdown()
    assert outs[True] == outs[False]
    assert launches[False] == 0 and launches[True] >= 3 * 8
