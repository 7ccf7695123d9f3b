"""AsyncEngine: the scheduler loop in its own thread, many concurrent asyncio callers."""

from __future__ import annotations

import asyncio

import pytest

from quantrt.engine.async_engine import AsyncEngine, QueueFullError
from quantrt.engine.engine import Engine

GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(model_path=str(tiny_models["llama"][0]), max_total_tokens=2048, page_size=4)


async def _collect(ae: AsyncEngine, ids: list[int]) -> dict:
    last = None
    async for snaps in ae.generate(input_ids=ids, sampling_params=GREEDY):
        last = snaps[-1]
    return last


def test_concurrent_callers_get_exactly_their_own_tokens(engine):
    prompts = [[5 + i, 6 + i, 7 + i * 3] * (i + 1) for i in range(10)]
    solo = [engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in prompts]
    ae = AsyncEngine(engine).start()

    async def main():
        return await asyncio.gather(*[_collect(ae, p) for p in prompts])

    outs = asyncio.run(main())
    ae.shutdown(drain_timeout=1)
    assert [o["output_ids"] for o in outs] == solo
    assert all(o["finished"] and o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)


def test_a_caller_that_leaves_aborts_its_request_and_frees_pages(engine):
    ae = AsyncEngine(engine).start()
    free_before = engine.allocator.available()

    async def leave_early():
        agen = ae.generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "max_new_tokens": 400})
        async for _ in agen:
            break
        await agen.aclose()
        for _ in range(100):
            if ae.num_active() == 0:
                break
            await asyncio.sleep(0.02)

    asyncio.run(leave_early())
    ae.shutdown(drain_timeout=1)
    assert ae.num_active() == 0 and not engine.scheduler.has_work()
    assert engine.allocator.available() == free_before


def test_queue_limit_refuses_with_a_clear_error(engine):
    ae = AsyncEngine(engine, max_queued=1).start()

    async def main():
        agen = ae.generate(input_ids=[[5, 6], [7, 8]], sampling_params=GREEDY)
        with pytest.raises(QueueFullError, match="limit is 1"):
            await agen.__anext__()

    asyncio.run(main())
    ae.shutdown(drain_timeout=1)


def test_shutdown_aborts_what_does_not_finish_in_time(engine):
    ae = AsyncEngine(engine).start()
    results = []

    async def main():
        async def run():
            async for snaps in ae.generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "max_new_tokens": 480}):
                results.append(snaps[-1])
        task = asyncio.create_task(run())
        await asyncio.sleep(0.2)
        await asyncio.get_running_loop().run_in_executor(None, ae.shutdown, 0.0)
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert results[-1]["finished"] and results[-1]["meta_info"]["finish_reason"]["type"] == "abort"
