"""The real `openai` client against a live uvicorn server on 127.0.0.1, and SIGTERM on a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from quantrt.engine.async_engine import AsyncEngine
from quantrt.engine.engine import Engine
from quantrt.server import create_app

KEY = "test-key"
GREEDY = {"temperature": 0}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def live(tiny_models):
    """(base_url, engine): a uvicorn server in a thread on an ephemeral loopback port."""
    engine = Engine(model_path=str(tiny_models["llama"][0]), max_total_tokens=4096, page_size=4,
                    served_model_name="tiny", api_key=KEY)
    ae = AsyncEngine(engine).start()
    app = create_app(ae, warmup=True, manage_engine=True, drain_timeout=1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True
    thread.join(timeout=20)
    sock.close()


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]


def test_models_and_chat(client, live):
    assert [m.id for m in client.models.list()] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, **GREEDY,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_chat_streaming_matches(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=10, extra_body={"ignore_eos": True}, **GREEDY)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(parts) == full and usage is not None and usage.completion_tokens == 10


def test_completions_and_streaming(client):
    r = client.completions.create(model="tiny", prompt=["Once upon a", "The cat"], max_tokens=5, **GREEDY)
    assert len(r.choices) == 2 and r.usage.completion_tokens <= 10
    full = client.completions.create(model="tiny", prompt="Once upon a", max_tokens=6, **GREEDY)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a", max_tokens=6, stream=True, **GREEDY))
    assert text == full.choices[0].text


def test_errors_raise_the_right_exceptions(client, live):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10**6)
    assert e.value.code == "context_length_exceeded" and "512" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", temperature=5)
    bad = openai.OpenAI(base_url=live[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(live[0] + "/health").status_code == 200


def _readme_blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Server"):text.index("## What works today")]
    return [b.split("\n", 1)[1] for b in section.split("```")[1::2] if b.startswith(lang + "\n")]


def test_readme_examples_run(live, capsys):
    """The README's curl and openai-client examples, pointed at the live server."""
    url, _ = live

    def fix(s: str) -> str:
        return s.replace("http://127.0.0.1:30000", url).replace("sk-local", KEY).replace("smollm2", "tiny")

    curls = [line for b in _readme_blocks("bash") for line in b.splitlines() if line.startswith("curl ")]
    assert len(curls) == 3
    for line in curls:
        out = subprocess.run(["bash", "-c", fix(line) + " -w '\\n%{http_code}'"], capture_output=True, text=True,
                             timeout=60).stdout
        assert out.rsplit("\n", 1)[-1] == "200", out
    (code,) = _readme_blocks("python")
    exec(compile(fix(code), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


# --------------------------------------------------------------------- SIGTERM on a real process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], port: int, env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", *cmd, "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not come up")


def _stream_tokens(port: int, max_tokens: int, on_first: threading.Event) -> list[dict]:
    chunks = []
    body = {"model": "tiny", "prompt": "Once", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    try:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
                    on_first.set()
    except httpx.HTTPError:
        pass
    on_first.set()
    return chunks


def test_sigterm_drains_in_flight_then_exits_0(tiny_models):
    """`quantrt serve` in a subprocess: SIGTERM mid-stream lets the request finish, then exits 0."""
    port = _free_port()
    cmd = ["quantrt", "serve", "--model-path", str(tiny_models["llama"][0]), "--served-model-name", "tiny",
           "--max-total-tokens", "8192"]
    proc = _start(cmd, port, {"QUANTRT_GRACEFUL_SHUTDOWN_TIMEOUT": "60"})
    first, result = threading.Event(), {}
    t = threading.Thread(target=lambda: result.setdefault("chunks", _stream_tokens(port, 300, first)))
    t.start()
    assert first.wait(30)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    t.join(timeout=30)
    assert rc == 0, proc.stdout.read().decode()  # type: ignore[union-attr]
    chunks = result["chunks"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(c["choices"][0]["text"]) > 0 for c in chunks) > 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_shutdown_timeout_aborts_what_is_left_and_frees_pages(tiny_models):
    """Past the graceful timeout, in-flight streams are cut and their KV pages freed."""
    engine = Engine(model_path=str(tiny_models["llama"][0]), max_total_tokens=4096, page_size=4,
                    served_model_name="tiny")
    free = engine.allocator.available()
    ae = AsyncEngine(engine).start()
    app = create_app(ae, manage_engine=True, drain_timeout=0.1, api_key=None)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", timeout_graceful_shutdown=0.2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    first, result = threading.Event(), {}
    t = threading.Thread(target=lambda: result.setdefault("chunks", _stream_tokens(port, 500, first)))
    t.start()
    assert first.wait(30)
    server.should_exit = True  # what the SIGTERM handler does
    thread.join(timeout=30)
    t.join(timeout=30)
    assert not thread.is_alive() and result["chunks"][-1]["choices"][0]["finish_reason"] is None
    assert ae.num_active() == 0 and engine.allocator.available() == free
