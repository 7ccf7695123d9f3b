"""bench/_cuda_profile.exposed_time: the wall clock a decode step's kernels add when PDL overlaps them.

CPU only: synthetic profiler events (start, end in µs) with known overlaps and gaps; the charges must add up to
the span of the step and number a layer's repeated kernels by their place in the layer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

from torch.autograd import DeviceType

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import _cuda_profile  # noqa: E402


def _prof(events: list[tuple[str, float, float]]) -> SimpleNamespace:
    evs = [SimpleNamespace(name=n, device_type=DeviceType.CUDA, time_range=SimpleNamespace(start=a, end=b))
           for n, a, b in events]
    evs.append(SimpleNamespace(name="host", device_type=DeviceType.CPU, time_range=SimpleNamespace(start=0, end=99)))
    return SimpleNamespace(events=lambda: evs)


def test_overlap_is_charged_once_and_idle_time_to_the_kernel_after_it():
    # a 0-10; b launched early (PDL) at 8, ends 14; c starts after a 2 µs gap; d runs inside c
    rows = _cuda_profile.exposed_time(_prof([("a", 0, 10), ("b", 8, 14), ("c", 16, 20), ("d", 17, 19)]), steps=1,
                                     layers=1)
    got = {r["kernel"]: r["us_per_step"] for r in rows}
    assert got == {"a": 10, "b": 4, "c": 4, "(idle before) c": 2, "d": 0}
    assert sum(got.values()) == 20                                   # the span of the step, counted once


def test_a_layers_linears_are_numbered_by_their_place_in_the_layer():
    # 2 steps (one prefill + one decode: steps + 1 = 2 runs), 2 layers: ring, norm, ring per layer
    events, t = [], 0.0
    for _ in range(2 * 2):
        for name, dur in (("ring", 3.0), ("norm", 1.0), ("ring", 5.0)):
            events.append((name, t, t + dur))
            t += dur
    got = {r["kernel"]: r["us_per_step"] for r in _cuda_profile.exposed_time(_prof(events), steps=1, layers=2)}
    assert got == {"ring #0": 12.0, "ring #1": 20.0, "norm": 4.0}
