"""Timeline of one graph-replayed batch-1 decode step from per-program timestamps (QUANTRT_CUDA_TRACE=1,
`platforms/cuda/kernels/trace.py`): for each traced kernel of a layer (W4A16 rings, `gemv_w8`, the bf16 GEMV, add +
RMSNorm, act * up and the decode attention), when its first program's grid dependency was met after the previous
kernel's last program ended, how long it streamed, and its tail.

    cd bench && python _cuda_timeline.py [--layers 32] [--splits] \
        [--configs "quantrt int4 (gptq g128),,quantrt int4 (gptq g128) [K=V]"]    (configs separated by ",,")
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch


def _name(o: dict) -> str:
    m = o["meta"]
    if "k" in m and "n" in m:
        return f"{o['kind']} {m['k']}x{m['n']}" + (f" pro {m['pro']}" if m.get("pro") else "")
    return o["kind"]


def _grid(o: dict) -> str:
    m = o["meta"]
    return f"{m['tiles']}x{m['split']}" if "tiles" in m else f"{m['b']}x{m['hkv']}" if "hkv" in m else "-"


def per_layer(launches: list[dict], layers: int) -> None:
    """Means over the step's layer cycles (the launches after one decode attention up to and including the next:
    every cycle has the same kernels), each kernel timed against the end of the kernel before it."""
    att = [i for i, o in enumerate(launches) if o["kind"] == "attn"][-layers:]
    cycles = [launches[a + 1:b + 1] for a, b in zip(att, att[1:])]
    if not cycles or len({tuple(o["kind"] for o in c) for c in cycles}) != 1:
        print(f"  no repeating layer pattern in the last step's {len(launches)} traced launches", flush=True)
        return
    print(f"  {len(cycles)} layer cycles of {len(cycles[0])} traced launches: {[_name(o) for o in cycles[0]]}")
    rows: dict[int, list[dict]] = {}
    for a, cyc in zip(att, cycles):
        prev_end = launches[a]["t"][:, 3].max().double()
        for pos, o in enumerate(cyc):
            t = o["t"].double()
            e0, w0, w1 = t[:, 0].min(), t[:, 1].min(), t[:, 1].max()
            l1, x1, xmed = t[:, 2].max(), t[:, 3].max(), t[:, 3].median()
            rows.setdefault(pos, []).append({
                "entry_before_prev_end": float(prev_end - e0), "wait_after_prev_end": float(w0 - prev_end),
                "wait_spread": float(w1 - w0), "loop": float(l1 - w0), "tail": float(x1 - l1),
                "median_end": float(xmed - w0), "exposed": float(x1 - prev_end)})
            prev_end = torch.maximum(prev_end, x1)
    keys = ["entry_before_prev_end", "wait_after_prev_end", "wait_spread", "loop", "tail", "median_end", "exposed"]
    print("| # | kernel | grid | entered before prev end | wait after prev end | wait spread | loop | tail | "
          "median end | exposed (us) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for pos, lst in sorted(rows.items()):   # the mean over layers (the timer ticks in 256 ns)
        vals = " | ".join(f"{statistics.fmean(r[k] for r in lst) / 1e3:.2f}" for k in keys)
        print(f"| {pos} | {_name(cycles[0][pos])} | {_grid(cycles[0][pos])} | {vals} |")
    total = sum(statistics.fmean(r["exposed"] for r in lst) for lst in rows.values()) / 1e3
    print(f"  a layer: {total:.2f} us (the sum of the exposed times)", flush=True)


SPLIT_KEYS = ["last_loop_vs_others", "tail", "last_epilogue", "other_epilogue", "last_loop", "other_loop"]


def split_rows(launches: list[dict], layers: int) -> dict[tuple[int, str], list[dict]]:
    """For every split-K launch of the layer cycles (as `per_layer` reads them): its last split (the programs with
    index // tiles == split - 1, the ones that gather the partials) against the others, in ns: when the last split's
    main loop ended against the others' latest ("last_loop_vs_others"), the launch's last exit after its last loop
    end ("tail"), and the mean epilogue (exit - loop end) and loop (loop end - wait) of each group."""
    att = [i for i, o in enumerate(launches) if o["kind"] == "attn"][-layers:]
    rows: dict[tuple[int, str], list[dict]] = {}
    for a, b in zip(att, att[1:]):
        for pos, o in enumerate(launches[a + 1:b + 1]):
            m = o["meta"]
            if m.get("split", 1) < 2 or "tiles" not in m:
                continue
            t = o["t"].double()
            last = torch.arange(t.shape[0]) // m["tiles"] == m["split"] - 1   # records are in program order
            if last.all() or not last.any():
                continue
            rows.setdefault((pos, _name(o)), []).append({
                "last_loop_vs_others": float(t[last, 2].max() - t[~last, 2].max()),
                "tail": float(t[:, 3].max() - t[:, 2].max()),
                "last_epilogue": float((t[last, 3] - t[last, 2]).mean()),
                "other_epilogue": float((t[~last, 3] - t[~last, 2]).mean()),
                "last_loop": float((t[last, 2] - t[last, 1]).mean()),
                "other_loop": float((t[~last, 2] - t[~last, 1]).mean())})
    return rows


def per_split(launches: list[dict], layers: int) -> None:
    """`split_rows` as a table of means over the layer cycles (µs)."""
    print("| kernel | last split's loop end - the others' | tail after the last loop end | last split's epilogue | "
          "the others' epilogue | last split's loop | the others' loop |")
    print("|---|---|---|---|---|---|---|")
    for (_, name), lst in sorted(split_rows(launches, layers).items()):
        print(f"| {name} | " + " | ".join(f"{statistics.fmean(r[k] for r in lst) / 1e3:.2f}" for k in SPLIT_KEYS)
              + " |")


def main() -> None:
    import _cuda_decode as cd  # bench/ is sys.path[0]

    from quantrt.platforms.cuda.kernels import trace

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--configs", default="quantrt int4 (gptq g128)", help="configs separated by ',,'")
    p.add_argument("--arch", default="llama3-8b", help="llama3-8b, qwen2.5-7b, qwen3-8b or gemma3-4b (`_cuda_checkpoint.ARCHS`)")
    p.add_argument("--layers", type=int, default=None, help="default: the model's")
    p.add_argument("--checkpoint", default=None, help="default: /tmp/<arch>-random")
    p.add_argument("--new", type=int, default=24)
    p.add_argument("--splits", action="store_true", help="also each split-K launch's last split against the others")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 8; long contexts)")
    a = p.parse_args()
    a.layers, a.checkpoint = cd.arch_paths(a.arch, a.layers, a.checkpoint)
    cd.use_prompt(a.prompt)
    os.environ["QUANTRT_CUDA_TRACE"] = "1"     # every engine below traces its kernels (read at each launch)
    args = argparse.Namespace(batches=[1], new=a.new, short=8, repeats=1, graphs="on", layers=a.layers)
    bw = cd.copy_bandwidth()
    base = cd.write_checkpoint(Path(a.checkpoint), a.layers, arch=a.arch)
    for name in a.configs.split(",,"):
        kw = cd.config_kw(name.strip())
        cd.bench_quantrt(cd.config_checkpoint(kw, base, a.checkpoint, a.layers, a.arch), name, kw, args, bw, [])   # launch ids stay unique across engines: records of an
                                                         # earlier engine keep their own launches
        torch.cuda.synchronize()
        per_layer(trace.timeline(), a.layers)
        if a.splits:
            per_split(trace.timeline(), a.layers)


if __name__ == "__main__":
    main()
