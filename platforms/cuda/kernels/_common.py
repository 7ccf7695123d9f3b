"""Helpers shared by the Triton linear kernels: availability checks and small launch utilities.

Triton is imported lazily so that `import quantrt` (and `can_implement` on a machine without Triton)
never pays for it. Under `TRITON_INTERPRET=1` the kernels run on CPU tensors (tests in CI).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

_COMPUTE = (torch.float16, torch.bfloat16)


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def gluon_available() -> bool:
    """Triton's Gluon dialect (triton >= 3.5) with the Hopper TMA / wgmma builtins."""
    try:
        return importlib.util.find_spec("triton.experimental.gluon.language.nvidia.hopper") is not None
    except ModuleNotFoundError:
        return False


def check_runtime(t: torch.Tensor, compute_dtype: torch.dtype) -> tuple[bool, str]:
    """Common `can_implement` checks: Triton importable, tensor on a GPU (or the interpreter), dtype."""
    if not triton_available():
        return False, "triton is not installed (pip install triton)"
    if t.device.type != "cuda" and not (interpret_mode() and t.device.type == "cpu"):
        return False, f"weight is on {t.device.type}, not a CUDA/ROCm device"
    if compute_dtype not in _COMPUTE:
        return False, f"compute dtype {compute_dtype} is not float16/bfloat16"
    return True, ""


@functools.cache
def num_sms(device_index: int = 0) -> int:
    """Streaming multiprocessors of the GPU (132 on an H100 SXM); 8 under the interpreter."""
    if not torch.cuda.is_available():
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pdl_supported(t: torch.Tensor) -> bool:
    """Programmatic dependent launch (`launch_pdl=True`, griddepcontrol): CUDA sm_90+, not ROCm or the
    interpreter, and not switched off with QUANTRT_CUDA_PDL=0 (read at each launch: graphs keep what they
    captured)."""
    return (t.device.type == "cuda" and not interpret_mode() and torch.version.hip is None
            and os.environ.get("QUANTRT_CUDA_PDL", "1") != "0" and sm_major(t.device.index or 0) >= 9)


def pdl_trigger(t: torch.Tensor) -> bool:
    """Whether a weight-streaming kernel calls `griddepcontrol.launch_dependents` once its main loop is done, so
    that the PDL-launched op after it (norm, rotary, activation: `pdl_triton`) is scheduled while its epilogue
    drains; the dependent still waits for the whole grid before it reads anything. `pdl_supported` and not
    switched off with QUANTRT_CUDA_PDL_TRIGGER=0 (read at each launch)."""
    return pdl_supported(t) and os.environ.get("QUANTRT_CUDA_PDL_TRIGGER", "1") != "0"


def pdl_release_at(t: torch.Tensor, early: bool) -> dict:
    """Where a weight-streaming kernel lets the next PDL op be scheduled, as its two constexprs: TRIGGER, after its
    main loop (`pdl_trigger`), or with `early` EARLY_RELEASE, at its start, for a next op that is small and reads
    before its own wait (the decode attention after q/k/v: `LinearKernel.release_early`; H100 int4 batch 1
    2.10 -> 2.02 ms a step with the attention's early reads, PERFORMANCE.md twenty-first session).
    QUANTRT_CUDA_EARLY_RELEASE=0 keeps every release after the main loop (read at each launch)."""
    on = pdl_trigger(t)
    early = early and os.environ.get("QUANTRT_CUDA_EARLY_RELEASE", "1") != "0"
    return {"TRIGGER": on and not early, "EARLY_RELEASE": on and early}


STREAM_PDL = "ring,dense,w8"  # H100 e2e A/B (PERFORMANCE.md, twelfth session), with the layer ops on PDL from
# one row: fp8 batch 1 3.50 -> 3.26 ms/step, bf16 5.60 -> 5.44, int4 batch 2-8 -5 to -2.5% (ring only to 8 rows)


def stream_pdl(t: torch.Tensor, kind: str) -> bool:
    """Whether the weight-streaming kernel `kind` ("ring": ring_wna16, "dense": the bf16 GEMV, "w8": gemv_w8) is
    launched with PDL: scheduled while the op before it runs, it issues its first weight loads and then waits
    (griddepcontrol.wait) before it reads x; its dependents are released only after its main loop
    (`pdl_trigger`), never at its start. `pdl_supported` and `kind` in the comma list QUANTRT_CUDA_STREAM_PDL
    (default STREAM_PDL; read at each launch, graphs keep what they captured)."""
    return pdl_supported(t) and kind in os.environ.get("QUANTRT_CUDA_STREAM_PDL", STREAM_PDL).split(",")


@functools.cache
def sm_major(device_index: int) -> int:
    """Compute capability major of a CUDA device (9 = Hopper)."""
    return torch.cuda.get_device_capability(device_index)[0]


def ring_device_why(device: torch.device) -> str:
    """'' when the Gluon TMA-ring kernels (`ring_wna16`, `ring_w8`: TMA + wgmma, sm_90) can run on `device`,
    else why not; QUANTRT_CUDA_RING=0 switches them off (read when a linear is prepared)."""
    if device.type != "cuda" or interpret_mode() or torch.version.hip is not None:
        return "not a CUDA device (Gluon/TMA kernel)"
    if not gluon_available():
        return "triton has no Gluon (needs triton >= 3.5)"
    if sm_major(device.index or 0) != 9:
        return f"sm_{sm_major(device.index or 0)}x is not Hopper (sm_90: TMA + wgmma)"
    if os.environ.get("QUANTRT_CUDA_RING", "1") == "0":
        return "switched off (QUANTRT_CUDA_RING=0)"
    return ""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pick_split_k(tiles: int, k_steps: int, sms: int) -> int:
    """Split K so that about two programs per SM run, keeping at least 4 K steps per split."""
    if tiles >= sms:
        return 1
    split = max(1, (2 * sms) // max(tiles, 1))
    return max(1, min(split, k_steps // 4 if k_steps >= 8 else 1, 16))


_SPLIT_COUNTERS: dict[tuple[str, int], torch.Tensor] = {}


def split_counters(device: torch.device, n_tiles: int) -> torch.Tensor:
    """Per-device int32 arrival counters for in-launch split-K reduction (the last program of a tile
    sums the partials and resets its counter, so every launch leaves them at zero). Shared by every
    split-K kernel; launches are stream-ordered."""
    key = (device.type, device.index or 0)
    c = _SPLIT_COUNTERS.get(key)
    if c is None or c.numel() < n_tiles:
        c = torch.zeros(max(n_tiles, 1024), dtype=torch.int32, device=device)
        _SPLIT_COUNTERS[key] = c
    return c


def split_k_buffers(x: torch.Tensor, n: int, split: int, reduce: int, n_tiles: int
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(y, workspace, counters) for REDUCE 0 (no split), 1 (fp32 atomics into y) or 2 (partials +
    last-arriver sum). y: [M, N] x.dtype, or the fp32 workspace itself for REDUCE 1."""
    m = x.shape[0]
    cnt = ws = None
    if reduce == 1:
        ws = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    elif reduce == 2:
        ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
        cnt = split_counters(x.device, n_tiles)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype) if reduce != 1 else ws
    return y, ws, cnt


def env_tiles(var: str, form: str, valid: Callable[[tuple], bool], fields: str = "block_n:block_k:stages:...",
              sizes: tuple[int, ...] = ()) -> dict[tuple, tuple]:
    """var="key=field:field:...+..." -> {key: config fields}, tile-table entries for A/B runs: key parts
    ':'-separated (ints, or names such as a kind), fields ints or True / False. An entry whose key `valid` refuses,
    whose field count is not in `sizes` (when given), or that does not parse, is an error that shows the expected
    `form=fields`."""
    out = {}
    for item in filter(None, os.environ.get(var, "").split("+")):
        key, _, val = item.partition("=")
        try:
            k = tuple(int(v) if v.isdigit() else v for v in key.split(":"))
            vals = tuple(v == "True" if v in ("True", "False") else int(v) for v in val.split(":"))
        except ValueError:
            k, vals = (), ()
        if not vals or not valid(k) or sizes and len(vals) not in sizes:
            raise ValueError(f"{var} entry {item!r} is not '{form}={fields}'")
        out[k] = vals
    return out
