"""Where a CPU decode step goes besides the linears: SmolLM2-135M GGUF (Q4_1), batch 1, greedy.

    python bench/cpu_decode_overhead.py [--dtypes float32 bfloat16] [--threads 1] [--new 64] [--repeats 5]

For each compute dtype and each of three paths:
  torch ops     the layers' torch math (norms, rotary, KV write + gather, SDPA, SiLU*mul: CpuPlatform's
                native layer ops switched off), linears unchanged;
  native ops    csrc/decode_ops.cpp per layer (add+RMSNorm, rotary+KV write, paged attention, act*mul);
  native stack  the whole decoder stack in one native call per step (quantrt_cpu::decode_stack);
it prints the steady step (median over --repeats of (t(new) - t(8)) / (new - 8), process CPU time and wall
time) and the same step's linears alone: every linear's kernel and the tied head called once each on a
one-row activation, the way the step calls them (CPU time, median of 7 x 20 steps). step - linears is the
rest: layer ops, Python, executor, sampling. With --threads 1 CPU time is the work per step, which a
shared box barely moves; wall times need a quiet box. The linears-alone loop pays a Python call per
linear that the stack path does not, so its "rest" is a slight underestimate (~2 us x 121 calls).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = [[1, 504, 2365, 6354, 16438, 27003, 690, 260]]


def _torch_ops_platform():
    from quantrt.platforms.xpu.cpu_platform import CpuPlatform

    class TorchOpsCpu(CpuPlatform):
        decode_attention_ref = None

        def _native_layer_ops(self):
            return None

    return TorchOpsCpu()


def steady(engine, new: int, repeats: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per steady decode step, medians."""
    def gen(n: int) -> None:
        engine.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": n, "temperature": 0,
                                                            "ignore_eos": True})

    gen(8)
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        gen(new)
        c1, w1 = time.process_time(), time.perf_counter()
        gen(8)
        c2, w2 = time.process_time(), time.perf_counter()
        cpu.append(((c1 - c0) - (c2 - c1)) / (new - 8) * 1e3)
        wall.append(((w1 - w0) - (w2 - w1)) / (new - 8) * 1e3)
    return statistics.median(cpu), statistics.median(wall)


def linears_alone(engine) -> float:
    """CPU ms of one step's linears (each kernel once, one activation row) and the tied head."""
    from quantrt.layers.linear import QuantLinear

    dtype = engine.dtype
    calls = [(torch.randn(1, m.in_features).to(dtype), k) for m in engine.model.modules()
             if isinstance(m, QuantLinear) for k in m.kernels]
    head = getattr(engine.model, "tied_head", None)
    if head is not None:
        calls.append((torch.randn(1, engine.config.hidden_size).to(dtype), head))

    def step() -> None:
        for x, k in calls:
            k.apply(x, None)

    for _ in range(5):
        step()
    runs = []
    for _ in range(7):
        c0 = time.process_time()
        for _ in range(20):
            step()
        runs.append((time.process_time() - c0) / 20 * 1e3)
    return statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from quantrt import Engine
    from quantrt.demo_model import default_model_path
    from quantrt.platforms.xpu import cpu_layer_ops

    print(f"native ops: {cpu_layer_ops.unavailable_reason() or 'available'}; threads {args.threads}; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    print("| dtype | path | step CPU ms | step wall ms | linears alone CPU ms | rest (step - linears) CPU ms |")
    print("|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        for path in ("torch ops", "native ops", "native stack"):
            plat = _torch_ops_platform() if path == "torch ops" else None
            eng = Engine(model_path=default_model_path(), max_total_tokens=2048, dtype=dtype, platform=plat)
            if path == "native ops":
                eng.model.model.decode_stack = None
            cpu, wall = steady(eng, args.new, args.repeats)
            lin = linears_alone(eng)
            row = {"dtype": dtype, "path": path, "step_cpu_ms": cpu, "step_wall_ms": wall, "linears_cpu_ms": lin,
                   "rest_cpu_ms": cpu - lin}
            rows.append(row)
            print(f"| {dtype} | {path} | {cpu:.2f} | {wall:.2f} | {lin:.2f} | {cpu - lin:.2f} |", flush=True)
            eng.shutdown()
    print(f"load at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "threads": args.threads}, indent=1))


if __name__ == "__main__":
    main()
