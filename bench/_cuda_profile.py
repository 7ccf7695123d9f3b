"""Profile analysis for bench/decode.py --cuda --profile: the wall clock each kernel of a decode step adds when
programmatic dependent launch (PDL) overlaps them (a kernel is resident, waiting, while the one before runs, so
kernel durations alone double-count)."""

from __future__ import annotations


def exposed_time(prof, steps: int, top: int = 24, layers: int = 32) -> list[dict]:
    """Where the GPU's wall clock goes when kernels overlap (PDL): kernels in start order, each charged with the
    time from the latest end before it to its own end (0 when it ends inside an earlier kernel), and the idle time
    before a kernel that starts after every earlier one ended charged to "(idle before) <kernel>"; per step,
    heaviest first (`layers`: decoder layers, to number the linears of a layer). Durations alone double-count:
    a PDL kernel is resident (waiting) while the one before runs."""
    from torch.autograd import DeviceType

    evs = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA and e.time_range.end > 0),
                 key=lambda e: e.time_range.start)
    per_name: dict[str, int] = {}
    for e in evs:
        per_name[e.name] = per_name.get(e.name, 0) + 1
    seen: dict[str, int] = {}
    charged: dict[str, float] = {}
    last_end = None
    for e in evs:
        t0, t1 = e.time_range.start, e.time_range.end
        # a kernel run r > 1 times a layer (the linears) is told apart by its place in the layer: "#i"
        r = per_name[e.name] // ((steps + 1) * layers)
        name = e.name if r < 2 else f"{e.name} #{seen.get(e.name, 0) % r}"
        seen[e.name] = seen.get(e.name, 0) + 1
        if last_end is not None and t0 > last_end:
            idle = "(idle before) " + name
            charged[idle] = charged.get(idle, 0.0) + (t0 - last_end)
        base = t0 if last_end is None else max(t0, last_end)
        charged[name] = charged.get(name, 0.0) + max(0.0, t1 - base)
        last_end = t1 if last_end is None else max(last_end, t1)
    rows = sorted(({"kernel": k, "us_per_step": v / steps} for k, v in charged.items()),
                  key=lambda r: -r["us_per_step"])
    wall = sum(r["us_per_step"] for r in rows)
    print(f"    exposed (wall clock of the GPU, PDL overlap counted once): {wall:.0f} µs per step", flush=True)
    for r in rows[:top]:
        print(f"      {r['us_per_step']:7.1f} µs/step ({100 * r['us_per_step'] / max(wall, 1e-9):4.1f}%)  "
              f"{r['kernel'][:100]}", flush=True)
    return rows[:60]
