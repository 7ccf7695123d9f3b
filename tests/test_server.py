"""HTTP routes and errors through httpx's ASGI transport (the AsyncEngine loop runs in its thread)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from quantrt.engine.async_engine import AsyncEngine
from quantrt.engine.engine import Engine
from quantrt.server import create_app

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(model_path=str(tiny_models["llama"][0]), max_total_tokens=4096, page_size=4,
                  served_model_name="tiny")


@pytest.fixture(scope="module")
def app(engine):
    ae = AsyncEngine(engine).start()
    yield create_app(ae)
    ae.shutdown(drain_timeout=1)


def call(app: Any, method: str, path: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def events(r: httpx.Response) -> list[Any]:
    out = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert out[-1] == "[DONE]"
    return [json.loads(x) for x in out[:-1]]


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def chat_ids(engine: Engine, messages: list[dict]) -> list[int]:
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return engine.tokenizer.encode(text, add_special_tokens=False)


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


# --------------------------------------------------------------------- info routes
def test_health_models_and_info(app, engine):
    assert call(app, "GET", "/health").status_code == 200
    models = call(app, "GET", "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert call(app, "GET", "/v1/models/tiny").json()["max_model_len"] == 512
    info = call(app, "GET", "/get_model_info").json()
    assert info["model_path"] == engine.server_args.model_path and info["is_generation"] is True
    srv = call(app, "GET", "/get_server_info").json()
    assert srv["platform"]["platform"] == "cpu" and srv["quantization"] == engine.quant_method
    assert srv["kernels"] and all(isinstance(v, int) for v in srv["kernels"].values())
    assert srv["kv_cache"]["max_total_tokens"] == engine.max_total_tokens
    assert srv["kv_cache"]["dtype"] == "float32" and srv["kv_cache"]["bytes_per_token"] > 0


# --------------------------------------------------------------------- chat
def test_chat_matches_the_engine_and_counts_usage(app, engine):
    r = call(app, "POST", "/v1/chat/completions", json={"model": "tiny", "messages": MSGS, "max_tokens": 9,
                                                        **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = chat_ids(engine, MSGS)
    solo = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 9, **GREEDY})
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": solo["text"]}
    assert choice["finish_reason"] == "length" and body["object"] == "chat.completion"
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == 9
    assert body["usage"]["total_tokens"] == len(ids) + 9


def test_chat_n_seed_and_logprobs(app):
    req = {"model": "tiny", "messages": MSGS, "max_completion_tokens": 5, "n": 3, "temperature": 1.0,
           "seed": 7, "logprobs": True, "top_logprobs": 2}
    a, b = (call(app, "POST", "/v1/chat/completions", json=req).json() for _ in range(2))
    assert [c["message"] for c in a["choices"]] == [c["message"] for c in b["choices"]]  # seeded
    assert [c["index"] for c in a["choices"]] == [0, 1, 2] and a["usage"]["completion_tokens"] == 15
    content = a["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)


def test_chat_stream_with_usage_equals_non_stream(app):
    req = {"model": "tiny", "messages": MSGS, "max_tokens": 12, **GREEDY}
    full = call(app, "POST", "/v1/chat/completions", json=req).json()
    r = call(app, "POST", "/v1/chat/completions",
             json={**req, "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


def test_chat_stop_string(app):
    first = call(app, "POST", "/v1/chat/completions",
                 json={"model": "tiny", "messages": MSGS, "max_tokens": 12, **GREEDY}).json()
    text = first["choices"][0]["message"]["content"]
    stop = text[3:6]
    r = call(app, "POST", "/v1/chat/completions",
             json={"model": "tiny", "messages": MSGS, "max_tokens": 12, "stop": [stop], **GREEDY}).json()
    assert r["choices"][0]["finish_reason"] == "stop" and stop not in r["choices"][0]["message"]["content"]


# --------------------------------------------------------------------- completions
def test_completions_prompts_echo_logprobs(app, engine):
    r = call(app, "POST", "/v1/completions", json={"model": "tiny", "prompt": ["Once upon", "a time"],
                                                   "max_tokens": 4, "echo": True, "logprobs": 1, **GREEDY})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    solo = engine.generate("Once upon", {"max_new_tokens": 4, **GREEDY})
    assert body["choices"][0]["text"] == "Once upon" + solo["text"]
    lp = body["choices"][0]["logprobs"]
    n_prompt = len(engine.tokenizer.encode("Once upon"))
    assert len(lp["tokens"]) == n_prompt + 4 and lp["token_logprobs"][0] is None
    assert body["usage"]["completion_tokens"] == 8
    ids = call(app, "POST", "/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3,
                                                     **GREEDY}).json()
    assert ids["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                            "prompt_tokens_details": {"cached_tokens": ids["usage"]["prompt_tokens_details"]
                                                      ["cached_tokens"]}}


def test_completions_stream(app):
    req = {"model": "tiny", "prompt": "Once upon", "max_tokens": 10, **GREEDY}
    full = call(app, "POST", "/v1/completions", json=req).json()
    chunks = events(call(app, "POST", "/v1/completions", json={**req, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]


# --------------------------------------------------------------------- /generate
def test_generate_native_shapes(app, engine):
    solo = engine.generate("Once upon", {"max_new_tokens": 6, **GREEDY})
    r = call(app, "POST", "/generate", json={"text": "Once upon",
                                             "sampling_params": {"max_new_tokens": 6, **GREEDY}}).json()
    assert r["text"] == solo["text"] and r["output_ids"] == solo["output_ids"]
    assert r["meta_info"]["completion_tokens"] == 6 and r["meta_info"]["finish_reason"]["type"] == "length"
    many = call(app, "POST", "/generate", json={"input_ids": [[5, 6], [7, 8, 9]], "return_logprob": True,
                                                "sampling_params": {"max_new_tokens": 3, **GREEDY}}).json()
    assert [m["index"] for m in many] == [0, 1] and len(many[1]["meta_info"]["output_token_logprobs"]) == 3
    chunks = events(call(app, "POST", "/generate", json={"text": "Once upon", "stream": True,
                                                         "sampling_params": {"max_new_tokens": 6, **GREEDY}}))
    assert chunks[-1]["text"] == solo["text"] and chunks[-1]["meta_info"]["completion_tokens"] == 6


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "temperature": "hot"}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": "10"}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "top_p": 1.5}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "n": 0}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": MSGS}, 404, "model_not_found"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": 100000}, 400,
     "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 600}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": [99999]}, 400, "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "invalid_value"),
    ("/generate", {"text": "hi", "input_ids": [1]}, 400, "invalid_value"),
    ("/generate", {"text": "hi", "sampling_params": {"temprature": 1}}, 400, "invalid_value"),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": "x"}}, 400, "invalid_value"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 10**9}}, 400, "context_length_exceeded"),
    ("/generate", {"text": "hi", "bogus": 1}, 400, "invalid_value"),
])
def test_bad_requests_get_openai_errors(app, path, body, status, code):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    assert_error(call(app, "POST", path, **kw), status, code)


def test_limit_is_named_and_routes_404_405(app):
    err = assert_error(call(app, "POST", "/v1/chat/completions",
                            json={"model": "tiny", "messages": MSGS, "max_tokens": 100000}), 400)
    assert "maximum context length is 512 tokens" in err["message"] and err["param"] == "max_tokens"
    assert_error(call(app, "GET", "/v1/nothing"), 404, "not_found")
    assert_error(call(app, "GET", "/v1/chat/completions"), 405, "method_not_allowed")
    assert_error(call(app, "GET", "/v1/models/other"), 404, "model_not_found")
    assert call(app, "GET", "/health").status_code == 200


def test_api_key_guards_every_route_but_health(engine):
    ae = AsyncEngine(engine).start()
    app = create_app(ae, api_key="sekrit")
    try:
        assert call(app, "GET", "/health").status_code == 200
        for path in ("/v1/models", "/get_model_info", "/get_server_info"):
            assert_error(call(app, "GET", path), 401, "invalid_api_key")
            assert_error(call(app, "GET", path, headers={"Authorization": "Bearer nope"}), 401)
            assert call(app, "GET", path, headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert_error(call(app, "POST", "/generate", json={"text": "hi"}), 401)
    finally:
        ae.shutdown(drain_timeout=1)


def test_queue_limit_gives_503_with_retry_after(engine):
    ae = AsyncEngine(engine, max_queued=1).start()
    app = create_app(ae)
    try:
        r = call(app, "POST", "/v1/chat/completions",
                 json={"model": "tiny", "messages": MSGS, "max_tokens": 2, "n": 2})
        assert_error(r, 503, "server_overloaded")
        assert r.headers["retry-after"] == "1"
    finally:
        ae.shutdown(drain_timeout=1)


def test_a_client_that_disconnects_frees_its_kv_pages(app, engine):
    """Drive the ASGI app by hand: the client goes away mid-request; its request is aborted."""
    free = engine.allocator.available()
    body = json.dumps({"model": "tiny", "prompt": "Once upon", "max_tokens": 400, **GREEDY}).encode()

    async def go() -> None:
        gone = asyncio.Event()
        sent_body = False

        async def receive() -> dict:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers":
                 [(b"content-type", b"application/json")], "query_string": b"", "asgi": {"version": "3.0"},
                 "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
                 "root_path": ""}
        task = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.sleep(0.3)
        assert app.state.server.ae.num_active() == 1
        gone.set()
        await asyncio.wait_for(task, 10)
        for _ in range(100):
            if app.state.server.ae.num_active() == 0:
                break
            await asyncio.sleep(0.02)

    asyncio.run(go())
    assert app.state.server.ae.num_active() == 0 and engine.allocator.available() == free
