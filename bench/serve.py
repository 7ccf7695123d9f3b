"""Serving load test: N concurrent streaming chat clients on loopback against a quantrt server.

    .venv/bin/python bench/serve.py                 # SmolLM2 demo model, 64 clients, 32 tokens each
    .venv/bin/python bench/serve.py --clients 8 --max-tokens 16 --model-path ./my-llama

Starts `python -m quantrt.launch_server` on 127.0.0.1 (ephemeral port), runs each distinct prompt
once alone (greedy, the reference), then all clients at once with `stream=True`. Reports output
throughput, TTFT and inter-token latency percentiles, and checks that every client got exactly the
text (and token count) of the solo run: no lost, duplicated or foreign tokens. Not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Name three primary colors.",
    "Explain gravity to a child.", "What is 12 times 7?", "Give me a tip for learning Python.",
    "Describe a cat in one sentence.", "Why is the sky blue?", "List two fruits that are red.",
    "What does a compiler do?", "Suggest a name for a pet fish.", "How many days are in a leap year?",
    "What is photosynthesis?", "Tell me a fun fact about octopuses.", "What is the boiling point of water?",
    "Translate 'good morning' into Spanish.",
]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def start_server(model_path: str | None, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "quantrt.launch_server", "--port", str(port), "--log-level", "warning", *extra]
    if model_path:
        cmd += ["--model-path", model_path]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not come up in 300 s")


def body(model: str, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    b = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
         "temperature": 0, "stream": stream}
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


async def solo(c: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    r = await c.post(url, json=body(model, prompt, max_tokens, False))
    r.raise_for_status()
    j = r.json()
    return j["choices"][0]["message"]["content"], j["usage"]["completion_tokens"]


async def client(c: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    stamps: list[float] = []
    parts: list[str] = []
    usage = None
    try:
        async with c.stream("POST", url, json=body(model, prompt, max_tokens, True)) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for ch in chunk["choices"]:
                    text = ch["delta"].get("content") or ""
                    if text:
                        stamps.append(time.perf_counter())
                        parts.append(text)
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"t0": t0, "stamps": stamps, "text": "".join(parts), "usage": usage, "end": time.perf_counter()}


async def run(args: argparse.Namespace, port: int) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=args.timeout, limits=limits) as c:
        model = (await c.get("/v1/models")).json()["data"][0]["id"]
        info = (await c.get("/get_server_info")).json()
        prompts = [PROMPTS[i % args.distinct] for i in range(args.clients)]
        ref = {}
        for p in sorted(set(prompts)):
            ref[p] = await solo(c, "/v1/chat/completions", model, p, args.max_tokens)
        t0 = time.perf_counter()
        results = await asyncio.gather(*[client(c, "/v1/chat/completions", model, p, args.max_tokens)
                                         for p in prompts])
        wall = time.perf_counter() - t0
    failures = [r["error"] for r in results if "error" in r]
    ok = [(p, r) for p, r in zip(prompts, results) if "error" not in r]
    mismatched = [p for p, r in ok if r["text"] != ref[p][0] or (r["usage"] or {}).get("completion_tokens")
                  != ref[p][1]]
    ttft = [(r["stamps"][0] - r["t0"]) * 1e3 for _, r in ok if r["stamps"]]
    itl = [(b - a) * 1e3 for _, r in ok for a, b in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum((r["usage"] or {}).get("completion_tokens", 0) for _, r in ok)
    return {
        "clients": args.clients, "max_tokens": args.max_tokens, "distinct_prompts": len(ref),
        "failures": len(failures), "failure_samples": failures[:3], "mismatched_vs_solo": len(mismatched),
        "output_tokens": tokens, "wall_s": round(wall, 2), "output_tok_per_s": round(tokens / wall, 1),
        "ttft_ms": {q: round(pct(ttft, q), 1) for q in (50, 90, 99)},
        "itl_ms": {q: round(pct(itl, q), 1) for q in (50, 90, 99)},
        "model": info.get("model_path"), "quantization": info.get("quantization"),
        "kernels": info.get("kernels"), "kv_max_total_tokens": info.get("kv_cache", {}).get("max_total_tokens"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--distinct", type=int, default=8, help=f"distinct prompts (<= {len(PROMPTS)}), cycled")
    ap.add_argument("--model-path", default=None, help="default: the SmolLM2 demo model")
    ap.add_argument("--timeout", type=float, default=600, help="per-request timeout (s)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra launch_server flag (repeatable)")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(args.model_path, port, [a for x in args.server_arg for a in x.split()])
    try:
        res = asyncio.run(run(args, port))
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    res.update({"server_exit_code": rc, "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
                "machine": platform.machine(), "load_avg_1m": round(os.getloadavg()[0], 1)})
    print(json.dumps(res, indent=2))
    return 0 if res["failures"] == 0 and res["mismatched_vs_solo"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
