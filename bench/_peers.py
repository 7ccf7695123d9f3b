"""Peer linear kernels for bench/kernels.py: gemlite and torchao from the carried wheels (.devcarry_peers/).

Every peer is optional. `build_peer(name, k, n)` raises `PeerSkipped` with the reason (package not
installed, no CUDA device, a GPU too old, the package rejects the shape/dtype or leaves the weight
unquantized); bench/kernels.py prints the reason and goes on. A built peer carries the dequantized weight
behind its first copy; `PeerEntry.rel_error(x)` compares the peer's output with
`x (fake-quantized per token for the A8 peers) @ w_ref.T` in float32, and bench/kernels.py reports a peer
over its tolerance as wrong instead of timing it.

Peers (public APIs only):
    gemlite_w4_bf16 / gemlite_w4_fp16  gemlite.helper.A16Wn, 4-bit g128 (W = (q - z) * s), bf16 / fp16 x
    gemlite_fp8                        gemlite.helper.A8W8_fp8_dynamic, fp8 per-channel weight, per-token x
    ao_int4                            torchao Int4WeightOnlyConfig(128, tile_packed_to_4d): tinygemm kernel
    ao_fp8_row                         torchao Float8DynamicActivationFloat8WeightConfig(PerRow()): _scaled_mm
    ao_int8                            torchao Int8DynamicActivationInt8WeightConfig(): int8 x int8
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from quantrt.quant.quantize import quantize_act_per_token

FP8 = torch.float8_e4m3fn
WHEELS = {"gemlite": "gemlite-0.6.0.post2-py3-none-any.whl",
          "torchao": "torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"}
Copies = Callable[[int], int]  # weight bytes -> how many weight copies to cycle through (bench/kernels.py)
# Over this relative error a peer's output is wrong, not merely less precise: fp32 accumulation gives ~3e-3,
# bf16 split-K atomics (gemlite) ~2e-2, per-token rounding conventions (amax/127 vs /127.5) ~5e-3 more,
# while a layout or scale bug gives O(1). The measured error is printed and tabulated either way.
TOL = 5e-2


class PeerSkipped(Exception):
    """A peer that cannot run here; the message says why."""


@dataclass
class PeerEntry:
    fns: list[Callable[[torch.Tensor], torch.Tensor]]  # one per weight copy: x [M, K] -> y [M, N]
    nbytes: int                                        # weight + scale bytes one call reads
    w_ref: torch.Tensor                                # [N, K] fp32, the dequantized weight behind fns[0]
    x_dtype: torch.dtype                               # activation dtype the peer takes
    act: torch.dtype | None = None                     # per-token activation quantization it applies

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> y [M, N] fp32: (per-token fake-quantized) x @ w_ref.T."""
        xf = x.float()
        if self.act is not None:
            q, s = quantize_act_per_token(x, self.act)                 # q [M, K], s [M, 1] fp32
            xf = q.float() * s
        return xf @ self.w_ref.t()

    def rel_error(self, x: torch.Tensor) -> float:
        """Relative Frobenius error of fns[0](x) against `reference(x)`; inf for a wrong shape or NaN."""
        y, ref = self.fns[0](x), self.reference(x)
        if y.shape != ref.shape or not torch.isfinite(y).all():
            return math.inf
        return float((y.float() - ref).norm() / ref.norm())


def peer_versions() -> str:
    """'gemlite 0.6.0.post2, torchao 0.18.0' from the installed metadata (nothing is imported)."""
    out = []
    for module in WHEELS:
        try:
            out.append(f"{module} {importlib.metadata.version(module)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{module} not installed")
    return ", ".join(out)


def require(module: str, min_capability: tuple[int, int] = (8, 0)) -> ModuleType:
    """Import `module` for a peer, or raise PeerSkipped naming every unmet requirement."""
    reasons = []
    if importlib.util.find_spec(module) is None:
        reasons.append(f"{module} is not installed (python -m pip install --no-deps "
                       f".devcarry_peers/{WHEELS[module]})")
    if not torch.cuda.is_available():
        reasons.append("no CUDA device (torch.cuda.is_available() is False)")
    elif torch.cuda.get_device_capability() < min_capability:
        reasons.append(f"needs compute capability >= {min_capability[0]}.{min_capability[1]}, this GPU has "
                       f"{'.'.join(map(str, torch.cuda.get_device_capability()))}")
    if reasons:
        raise PeerSkipped("; ".join(reasons))
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 (a broken install is a reason to skip, not to crash the bench)
        raise PeerSkipped(f"import {module} failed: {type(e).__name__}: {e}") from e


def grid_int4(n: int, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random 4-bit grouped weight that every int4 scheme represents exactly.

    -> codes [N, K] uint8 in 0..15, scale [N, K/group] fp32 (powers of two), w = (codes - 8) * scale [N, K]
    fp32, exact in bf16/fp16. Every group holds both 0 and 15, so min/max qparams (torchao's tinygemm
    algorithm) recover scale and zero exactly: the quantized weight is `w` itself.
    """
    codes = torch.randint(0, 16, (n, k // group, group), device="cuda", dtype=torch.uint8)
    codes[:, :, 0], codes[:, :, 1] = 0, 15
    scale = torch.exp2(-torch.randint(6, 10, (n, k // group), device="cuda").float())
    w = (codes.float() - 8) * scale[:, :, None]
    return codes.reshape(n, k), scale, w.reshape(n, k)


def _gemlite(min_capability: tuple[int, int] = (8, 0)) -> ModuleType:
    """gemlite, with its autotuner bounded for the GEMM kernels (once per process).

    gemlite ships tuned H100 configs per (M bucket, N, K, group, dtype); where it has one it runs it in
    every autotune mode. For the GEMM / split-K GEMM keys it ships none for (8192², M = 64) its 'fast'
    autotune compiles ~23 tiles (>10 s per key on the H100), which the device budget of a full table cannot
    pay, so those pick between its 2 'default' tiles. The GEMV kernels (M <= 4) keep the 'fast' autotune
    (their 'default' mode is one untuned tile that would bypass the shipped configs as well).
    """
    gl = require("gemlite", min_capability)
    global _GEMLITE_AUTOTUNE_SET
    if not _GEMLITE_AUTOTUNE_SET:
        gl.set_autotune({"GEMM": "default", "GEMM_SPLITK": "default"})
        _GEMLITE_AUTOTUNE_SET = True
    return gl


_GEMLITE_AUTOTUNE_SET = False


def _gemlite_w4(k: int, n: int, copies_for: Copies, dtype: torch.dtype) -> PeerEntry:
    _gemlite()
    from gemlite.helper import A16Wn

    nbytes = n * k // 2 + 2 * n * (k // 128) * 2                 # packed codes + 16-bit scales and zeros
    fns, w_ref = [], None
    for _ in range(copies_for(nbytes)):
        codes, scale, w = grid_int4(n, k, 128)
        lin = A16Wn(device="cuda:0", dtype=dtype).from_weights(
            codes, scale.to(dtype), torch.full_like(scale, 8.0).to(dtype), W_nbits=4, group_size=128)
        fns.append(lin)
        w_ref = w if w_ref is None else w_ref
    return PeerEntry(fns, nbytes, w_ref, dtype)


def _gemlite_fp8(k: int, n: int, copies_for: Copies) -> PeerEntry:
    _gemlite((8, 9))
    from gemlite.helper import A8W8_fp8_dynamic

    nbytes = n * k + n * 4
    fns, w_ref = [], None
    for _ in range(copies_for(nbytes)):
        data = (torch.randn(n, k, device="cuda") * 100).clamp(-448, 448).to(FP8)   # [N, K], no NaN codes
        scale = torch.rand(n, 1, device="cuda") * 0.01 + 0.001                       # [N, 1] fp32
        fns.append(A8W8_fp8_dynamic(device="cuda:0", dtype=torch.bfloat16).from_weights(data, scales=scale))
        w_ref = data.float() * scale if w_ref is None else w_ref
    return PeerEntry(fns, nbytes, w_ref, torch.bfloat16, act=FP8)


def _torchao(k: int, n: int, copies_for: Copies, kind: str) -> PeerEntry:
    require("torchao", (8, 9) if kind == "fp8" else (8, 0))
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
        quantize_,
    )

    cfg, tensor_type, act, nbytes = {
        "int4": (Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d",
                                      set_inductor_config=False),
                 "Int4TilePackedTo4dTensor", None, n * k // 2 + n * (k // 128) * 4),
        "fp8": (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False),
                "Float8Tensor", FP8, n * k + n * 4),
        "int8": (Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
                 "Int8Tensor", torch.int8, n * k + n * 4),
    }[kind]
    fns, w_ref = [], None
    for _ in range(copies_for(nbytes)):
        grid = grid_int4(n, k, 128)[2] if kind == "int4" else None
        w = (grid if grid is not None else torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
        quantize_(lin, cfg)
        if type(lin.weight).__name__ != tensor_type:  # torchao skips shapes it cannot handle silently
            raise PeerSkipped(f"torchao left the {k}x{n} weight as {type(lin.weight).__name__}, "
                              f"not {tensor_type}")
        fns.append(lin)
        if w_ref is None:  # Int4TilePackedTo4dTensor has no dequantize(): its grid weight is exact
            w_ref = grid if grid is not None else lin.weight.dequantize().float()
    return PeerEntry(fns, nbytes, w_ref, torch.bfloat16, act=act)


PEERS: dict[str, Callable[[int, int, Copies], PeerEntry]] = {
    "gemlite_w4_bf16": lambda k, n, c: _gemlite_w4(k, n, c, torch.bfloat16),
    "gemlite_w4_fp16": lambda k, n, c: _gemlite_w4(k, n, c, torch.float16),
    "gemlite_fp8": _gemlite_fp8,
    "ao_int4": lambda k, n, c: _torchao(k, n, c, "int4"),
    "ao_fp8_row": lambda k, n, c: _torchao(k, n, c, "fp8"),
    "ao_int8": lambda k, n, c: _torchao(k, n, c, "int8"),
}


def build_peer(name: str, k: int, n: int, copies_for: Copies) -> PeerEntry:
    """The peer `name` at weight [N, K] (copies_for(weight bytes) copies of it), or PeerSkipped saying why
    it cannot run here."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; peers: {', '.join(PEERS)}")
    try:
        return PEERS[name](k, n, copies_for)
    except PeerSkipped:
        raise
    except Exception as e:  # noqa: BLE001 (the package rejects this shape/dtype: report it, run the rest)
        raise PeerSkipped(f"{name} rejects K={k}, N={n}: {type(e).__name__}: {str(e)[:300]}") from e
