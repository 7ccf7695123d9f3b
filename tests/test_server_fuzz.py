"""Property-based tests: any request body gets a 200 or an OpenAI-style error, and the server lives on."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantrt.engine.async_engine import AsyncEngine
from quantrt.engine.engine import Engine
from quantrt.server import create_app

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ALLOWED = {200, 400, 404, 413}

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                         max_size=3), max_leaves=6)
small = st.integers(-2, 6)
maybe = lambda s: s | junk  # noqa: E731  (a plausible value or any JSON value)
role = st.sampled_from(["system", "user", "assistant", "developer", "tool", "robot"])
message = st.fixed_dictionaries({"role": maybe(role)},
                                optional={"content": maybe(st.text(max_size=30)), "name": st.text(max_size=4)})
common = {
    "temperature": maybe(st.floats(-1, 3, allow_nan=False)), "top_p": maybe(st.floats(-0.5, 1.5)),
    "top_k": maybe(st.integers(-3, 50)), "n": maybe(st.integers(-1, 3)), "stop": maybe(st.text(max_size=3)),
    "seed": maybe(st.integers(-(2**65), 2**65)), "stream": maybe(st.booleans()),
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "frequency_penalty": maybe(st.floats(-3, 3)), "presence_penalty": maybe(st.floats(-3, 3)),
    "repetition_penalty": maybe(st.floats(0, 3)), "min_p": maybe(st.floats(-1, 2)),
}
model = maybe(st.sampled_from(["tiny", "other"]))
chat_body = st.fixed_dictionaries(
    {"model": model, "messages": maybe(st.lists(message, max_size=3)), "max_tokens": maybe(small)},
    optional={**common, "logprobs": maybe(st.booleans()), "top_logprobs": maybe(st.integers(-1, 25)),
              "max_completion_tokens": maybe(small)})
prompt = st.text(max_size=40) | st.lists(st.text(max_size=10), max_size=3) | st.lists(st.integers(-5, 500), max_size=5)
completion_body = st.fixed_dictionaries(
    {"model": model, "prompt": maybe(prompt), "max_tokens": maybe(small)},
    optional={**common, "echo": maybe(st.booleans()), "logprobs": maybe(st.integers(-1, 25))})
sampling = st.fixed_dictionaries({"max_new_tokens": maybe(small)},
                                 optional={k: v for k, v in common.items() if k not in ("n", "stream",
                                                                                      "stream_options")})
generate_body = st.fixed_dictionaries(
    {"sampling_params": maybe(sampling)},
    optional={"text": maybe(prompt), "input_ids": maybe(st.lists(st.integers(-5, 500), max_size=5)),
              "stream": maybe(st.booleans()), "return_logprob": maybe(st.booleans()),
              "top_logprobs_num": maybe(st.integers(-1, 25)), "logprob_start_len": maybe(st.integers(-3, 3))})


@pytest.fixture(scope="module")
def app(tiny_models):
    engine = Engine(model_path=str(tiny_models["llama"][0]), max_total_tokens=4096, page_size=4,
                    served_model_name="tiny")
    ae = AsyncEngine(engine).start()
    yield create_app(ae)
    assert ae.error is None, ae.error
    ae.shutdown(drain_timeout=1)


def post(app: Any, path: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(path, **kw)

    return asyncio.run(go())


def check(r: httpx.Response) -> None:
    assert r.status_code in ALLOWED, r.text
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    elif not r.headers["content-type"].startswith("text/event-stream"):
        body = r.json()
        assert "usage" in body or "meta_info" in body or all("meta_info" in x for x in body)


@FUZZ
@given(body=chat_body)
def test_chat_bodies(app, body):
    check(post(app, "/v1/chat/completions", json=body))


@FUZZ
@given(body=completion_body)
def test_completion_bodies(app, body):
    check(post(app, "/v1/completions", json=body))


@FUZZ
@given(body=generate_body)
def test_generate_bodies(app, body):
    check(post(app, "/generate", json=body))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(raw=st.binary(max_size=64) | junk.map(lambda v: repr(v).encode()))
def test_raw_bytes(app, raw):
    for path in ("/v1/chat/completions", "/v1/completions", "/generate"):
        r = post(app, path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"]


def test_server_still_healthy_after_fuzzing(app):
    async def go() -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return (await c.get("/health")).status_code

    assert asyncio.run(go()) == 200 and app.state.server.ae.error is None
