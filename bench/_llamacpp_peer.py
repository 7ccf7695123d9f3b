"""llama.cpp peer for bench/decode.py: run inside the llama-cpp-python venv, never imported by quantrt.

    <venv>/bin/python bench/_llamacpp_peer.py MODEL.gguf '{"ids": [...], "new": 64, "short": 8,
                                                        "repeats": 2, "threads": 2}'

Greedy decoding (top_k=1, temp 0) of `new` tokens after the given prompt ids, batch 1, EOS ignored
(tokens are taken from `Llama.generate` until `new` have come). The KV cache is reset before every
run, so no prefix is reused. One warm-up, then best of `repeats` for `new` and for `short` tokens.
Prints one JSON line: {"t_long", "t_short", "c_long", "c_short" (process CPU seconds, all threads),
"tokens", "version", "system_info"}.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import llama_cpp
    from llama_cpp import Llama

    model, spec = sys.argv[1], json.loads(sys.argv[2])
    ids, threads = spec["ids"], spec["threads"]
    llm = Llama(model_path=model, n_ctx=len(ids) + spec["new"] + 16, n_threads=threads,
                n_threads_batch=threads, seed=0, verbose=False)

    def run(n: int) -> list[int]:
        llm.reset()
        out = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == n:
                break
        return out

    def best(n: int) -> tuple[float, float, list[int]]:
        t, cpu, out = float("inf"), float("inf"), []
        for _ in range(spec["repeats"]):
            t0, c0 = time.perf_counter(), time.process_time()
            out = run(n)
            t, cpu = min(t, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        return t, cpu, out

    run(spec["short"])  # warm-up
    t_long, c_long, tokens = best(spec["new"])
    t_short, c_short, _ = best(spec["short"])
    print(json.dumps({"t_long": t_long, "t_short": t_short, "c_long": c_long, "c_short": c_short, "tokens": tokens,
                      "version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode()}))


if __name__ == "__main__":
    main()
