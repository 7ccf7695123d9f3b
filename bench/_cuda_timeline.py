"""Timeline of one graph-replayed batch-1 decode step from per-program timestamps (QUANTRT_CUDA_TRACE=1,
`platforms/cuda/kernels/trace.py`): for each kernel of a layer (the four W4A16 rings and the decode attention),
when its first program's grid dependency was met after the previous kernel's last program ended, how long it
streamed, and its tail.

    cd bench && python _cuda_timeline.py [--layers 32] \
        [--configs "quantrt int4 (gptq g128),,quantrt int4 (gptq g128) [K=V]"]    (configs separated by ",,")
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

os.environ["QUANTRT_CUDA_TRACE"] = "1"


def per_layer(launches: list[dict], layers: int) -> None:
    step = launches[-5 * layers:]
    kinds = [o["kind"] for o in step]
    print(f"  last step: {len(step)} traced launches; pattern of the first layer: {kinds[:5]}", flush=True)
    rows: dict[int, list[dict]] = {}
    prev_end = None
    for i, o in enumerate(step):
        t = o["t"].double()
        e0, w0, w1 = t[:, 0].min(), t[:, 1].min(), t[:, 1].max()
        l1, x1, xmed = t[:, 2].max(), t[:, 3].max(), t[:, 3].median()
        r = {"entry_before_prev_end": float(prev_end - e0) if prev_end is not None else 0.0,
             "wait_after_prev_end": float(w0 - prev_end) if prev_end is not None else 0.0,
             "wait_spread": float(w1 - w0), "loop": float(l1 - w0), "tail": float(x1 - l1),
             "median_end": float(xmed - w0), "span": float(x1 - w0),
             "exposed": float(x1 - prev_end) if prev_end is not None else float(x1 - w0)}
        rows.setdefault(i % 5, []).append((o, r))
        prev_end = x1
    names = {}
    print("| # | kernel | grid | entry before prev end | wait after prev end | wait spread | loop | tail | "
          "median end | exposed (us) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for pos, lst in sorted(rows.items()):
        o = lst[0][0]
        meta = o["meta"]
        names[pos] = (f"ring {meta['k']}x{meta['n']} pro {meta['pro']}" if o["kind"] == "ring" else "attention")
        grid = f"{meta.get('tiles', meta.get('b'))}x{meta.get('split', meta.get('hkv'))}"

        def med(key: str, lst: list = lst) -> str:   # the mean over layers 1.. (the timer ticks in 256 ns)
            return f"{statistics.fmean(r[key] for _, r in lst[1:]) / 1e3:.2f}"

        print(f"| {pos} | {names[pos]} | {grid} | {med('entry_before_prev_end')} | {med('wait_after_prev_end')} | "
              f"{med('wait_spread')} | {med('loop')} | {med('tail')} | {med('median_end')} | {med('exposed')} |")
    t_all = torch.cat([o["t"].flatten() for o in step])
    d = torch.diff(torch.unique(t_all % 10_000))
    print(f"  timer granularity: smallest step between distinct values mod 10 us: {int(d.min()) if len(d) else -1} ns")
    total = float(step[-1]["t"][:, 3].max() - step[0]["t"][:, 1].min()) / 1e3
    print(f"  first wait to last end of the step's traced kernels: {total:.1f} us ({total / layers:.2f} per layer)")


def main() -> None:
    import _cuda_decode as cd  # bench/ is sys.path[0]

    from quantrt.platforms.cuda.kernels import trace

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--configs", default="quantrt int4 (gptq g128)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--checkpoint", default="/tmp/llama8b-random")
    p.add_argument("--new", type=int, default=24)
    a = p.parse_args()
    args = argparse.Namespace(batches=[1], new=a.new, short=8, repeats=1, graphs="on", layers=a.layers)
    bw = cd.copy_bandwidth()
    for name in a.configs.split(",,"):
        kw = cd.config_kw(name.strip())
        src = Path(a.checkpoint)
        cd.write_checkpoint(src, a.layers)
        for fmt in ("gptq", "awq"):
            if kw.pop(fmt, False):
                src = cd.write_checkpoint(Path(f"{a.checkpoint}-{fmt}"), a.layers, **{fmt: True})
        trace._META.clear()
        cd.bench_quantrt(src, name, kw, args, bw, [])
        torch.cuda.synchronize()
        per_layer(trace.timeline(), a.layers)


if __name__ == "__main__":
    main()
