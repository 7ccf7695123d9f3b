"""The `quantrt` CLI: argument plumbing with a fake engine, env in a subprocess, clean errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from quantrt.cli import main
from quantrt.demo_model import DEMO_FILE


class FakeTokenizer:
    """Renders messages as `role: content` lines."""

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool,
                            add_generation_prompt: bool) -> str:
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class FakeEngine:
    """Follows the Engine contract; records every call."""

    instances: list[FakeEngine] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple[Any, Any, bool]] = []
        self.tokenizer = FakeTokenizer()
        self.closed = False
        FakeEngine.instances.append(self)

    def generate(self, prompt: Any = None, sampling_params: Any = None, stream: bool = False) -> Any:
        self.calls.append((prompt, sampling_params, stream))
        if stream:
            return self._stream(prompt)
        if isinstance(prompt, str):
            return {"text": f"<{prompt}>", "meta_info": {}}
        return [{"text": f"<{p}>", "meta_info": {}} for p in prompt]

    def _stream(self, prompt: str) -> Iterator[dict[str, Any]]:
        reply = f"reply{len(self.calls)}"
        for i in range(1, len(reply) + 1):
            yield {"text": reply[:i], "meta_info": {}}

    def shutdown(self) -> None:
        self.closed = True


def run(argv: list[str], stdin: str = "") -> tuple[int, str, str, FakeEngine | None]:
    FakeEngine.instances.clear()
    out, err = io.StringIO(), io.StringIO()
    rc = main(argv, engine_factory=FakeEngine, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    engine = FakeEngine.instances[-1] if FakeEngine.instances else None
    return rc, out.getvalue(), err.getvalue(), engine


# --------------------------------------------------------------------- generate
def test_generate_plumbing() -> None:
    rc, out, err, engine = run([
        "generate", "--model-path", "/m", "--quantization", "fp8", "--prompt", "a", "b",
        "--max-new-tokens", "5", "--temperature", "0.5", "--top-p", "0.9", "--top-k", "4",
        "--seed", "11", "--stop", "x",
    ])
    assert rc == 0, err
    assert engine is not None and engine.closed
    assert engine.kwargs["model_path"] == "/m" and engine.kwargs["quantization"] == "fp8"
    assert engine.kwargs["port"] == 30000  # every ServerArgs field is passed
    prompts, params, stream = engine.calls[0]
    assert prompts == ["a", "b"] and stream is False
    assert params == {"max_new_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 4,
                      "seed": 11, "stop": ["x"]}
    assert "<a>" in out and "<b>" in out


def test_generate_uses_demo_model_and_says_so() -> None:
    rc, out, err, engine = run(["generate", "hi"])
    assert rc == 0, err
    assert engine is not None and engine.kwargs["model_path"].endswith(DEMO_FILE)
    assert "using the demo model" in err
    assert out == "<hi>\n"


def test_generate_chat_and_stream() -> None:
    rc, out, err, engine = run(["generate", "--model-path", "/m", "--chat", "--stream", "--system", "S", "hi"])
    assert rc == 0, err
    assert engine is not None
    prompt, _, stream = engine.calls[0]
    assert prompt == "system: S\nuser: hi\nassistant:" and stream is True
    assert out == "reply1\n"


def test_generate_reads_stdin_prompt() -> None:
    rc, out, _, _ = run(["generate", "--model-path", "/m"], stdin="from stdin\n")
    assert rc == 0 and out == "<from stdin>\n"


def test_generate_without_prompt_is_clean_error() -> None:
    rc, _, err, engine = run(["generate", "--model-path", "/m"])
    assert rc == 2 and engine is None
    assert err.startswith("error: no prompt given")


def test_not_supported_flag_is_one_line_error() -> None:
    rc, _, err, engine = run(["generate", "--model-path", "/m", "--tp-size", "2", "hi"])
    assert rc == 2 and engine is None
    assert err == "error: --tp-size 2 is not supported yet: tensor parallelism comes in a later issue\n"


def test_bad_choice_lists_options() -> None:
    rc, _, err, _ = run(["chat", "--model-path", "/m", "--kv-cache-dtype", "fp9"])
    assert rc == 2
    assert "error: quantrt chat: argument --kv-cache-dtype: invalid choice: 'fp9'" in err
    assert "'fp8_e4m3'" in err and "'fp4_e2m1'" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------- chat
def test_chat_history_reset_exit() -> None:
    rc, out, err, engine = run(
        ["chat", "--model-path", "/m", "--max-new-tokens", "3"],
        stdin="hello\n\nagain\n/reset\nfresh\n/exit\nnever\n",
    )
    assert rc == 0, err
    assert engine is not None and engine.closed
    prompts = [c[0] for c in engine.calls]
    assert prompts == [
        "user: hello\nassistant:",
        "user: hello\nassistant: reply1\nuser: again\nassistant:",
        "user: fresh\nassistant:",
    ]
    assert all(c[1] == {"max_new_tokens": 3} and c[2] is True for c in engine.calls)
    assert out == "reply1\nreply2\nreply3\n"
    assert "(history cleared)" in err


def test_chat_ends_at_eof() -> None:
    rc, out, _, engine = run(["chat", "--model-path", "/m"], stdin="one")
    assert rc == 0 and out == "reply1\n" and engine is not None and engine.closed


# --------------------------------------------------------------------- env / serve / subprocess
def test_env_json_in_process() -> None:
    out = io.StringIO()
    assert main(["env", "--json", "--device", "cpu"], stdout=out, stderr=io.StringIO()) == 0
    info = json.loads(out.getvalue())
    assert {"platform", "quantization", "quantization_not_built_yet", "torch", "quantrt", "python"} <= set(info)
    assert "fp8" in info["quantization"] and "qoq" in info["quantization_not_built_yet"]
    assert info["platform"]["platform"] == "cpu" and "reference" in info["platform"]["linear_kernels"]


def test_env_subprocess_prints_platform() -> None:
    proc = subprocess.run([sys.executable, "-m", "quantrt", "env"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("platform: ")
    assert "torch: " in proc.stdout and "python: " in proc.stdout


def test_bad_flag_subprocess_exits_2_cleanly() -> None:
    proc = subprocess.run([sys.executable, "-m", "quantrt", "generate", "--quantization", "nope", "hi"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "invalid choice: 'nope'" in proc.stderr and "'quark_int4fp8_moe'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_without_launch_server_or_runs_it() -> None:
    rc, _, err, _ = run(["serve", "--model-path", "/m", "--tp-size", "2"])
    assert rc == 2
    assert "is not supported yet" in err


def test_help_exits_zero(capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--help"]) == 0
    assert "--kv-cache-dtype" in capsys.readouterr().out
