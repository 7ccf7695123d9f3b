"""`--fp8-gemm-backend` / `--fp4-gemm-backend` on CUDA and ROCm: SGLang 0.5.9's choices and `auto`
order (FORMATS.md §4.2), checked against what is installed and what the GPU is.

quantrt runs its own kernels: block FP8 through Triton (`triton`); per-tensor / per-channel FP8
through Triton below 64 rows and cuBLASLt (`torch._scaled_mm`) from there (SGLang does not route
those through the flag either); NVFP4/MXFP4 through quantrt's own kernels (no FP4 tensor cores on
Hopper). Vendor backends (DeepGEMM, FlashInfer, sgl-kernel CUTLASS) are not called by quantrt: a
named one fails with what it needs and what is available; `auto` skips them and says why.
aiter (ROCm, `SGLANG_USE_AITER=1`) runs through quantrt.platforms.rocm's adapter.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from quantrt.errors import ConfigError

_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class GemmEnv:
    """What the checks look at: SM as major*10+minor (None: no CUDA GPU), HIP or not, importable
    vendor packages, the environment. `probe_env` fills it; tests build it by hand."""

    sm: int | None
    hip: bool = False
    packages: frozenset[str] = frozenset()
    environ: Mapping[str, str] = field(default_factory=dict)

    def flag(self, name: str, default: bool = False) -> bool:
        v = self.environ.get(name)
        if v is None or v == "":
            return default
        return v.strip().lower() not in _OFF if default else v.strip().lower() in _ON


PROBED_PACKAGES = ("deep_gemm", "flashinfer", "sgl_kernel", "aiter", "triton")


def probe_env(platform, environ: Mapping[str, str] | None = None) -> GemmEnv:
    """GemmEnv of `platform` (a CudaPlatform or RocmPlatform): capability, HIP, installed packages."""
    cap = platform.capability()
    pkgs = frozenset(p for p in PROBED_PACKAGES if importlib.util.find_spec(p) is not None)
    return GemmEnv(cap.to_int() if cap else None, platform.name == "rocm", pkgs,
                   dict(os.environ if environ is None else environ))


def _cuda_sm(env: GemmEnv, ok: Callable[[int], bool], what: str) -> str:
    if env.hip or env.sm is None:
        return f"needs an NVIDIA GPU with {what}"
    return "" if ok(env.sm) else f"needs {what}, this GPU is sm_{env.sm}"


def _package(env: GemmEnv, pkg: str) -> str:
    if pkg not in env.packages:
        return f"needs the `{pkg}` package, which is not installed"
    return f"`{pkg}` is installed, but quantrt has no adapter for it yet"


def _vendor(env: GemmEnv, pkg: str, sm_ok: Callable[[int], bool], sm_what: str) -> str:
    return _cuda_sm(env, sm_ok, sm_what) or _package(env, pkg)


def _deep_gemm(env: GemmEnv) -> str:
    if not env.flag("SGLANG_ENABLE_JIT_DEEPGEMM", default=True):
        return "SGLANG_ENABLE_JIT_DEEPGEMM is off"
    return _vendor(env, "deep_gemm", lambda sm: sm >= 90, "sm_90+")


def _aiter(env: GemmEnv) -> str:
    if not env.hip:
        return "needs ROCm (HIP)"
    if not (env.flag("SGLANG_USE_AITER") or env.flag("QUANTRT_USE_AITER")):
        return "needs SGLANG_USE_AITER=1"
    return "" if "aiter" in env.packages else "needs the `aiter` package, which is not installed"


def _triton(env: GemmEnv) -> str:
    return "" if "triton" in env.packages else "needs the `triton` package, which is not installed"


_BLACKWELL = (lambda sm: sm >= 100, "a Blackwell GPU (sm_100+)")

# name -> (what it runs, availability check returning '' or why not); dict order = SGLang's auto order
FP8_BACKENDS: dict[str, tuple[str, Callable[[GemmEnv], str]]] = {
    "deep_gemm": ("DeepGEMM block-FP8", _deep_gemm),
    "flashinfer_trtllm": ("FlashInfer TRT-LLM gemm_fp8_nt_groupwise",
                          lambda e: _vendor(e, "flashinfer", *_BLACKWELL)),
    "cutlass": ("sgl-kernel CUTLASS block-FP8",
                lambda e: _vendor(e, "sgl_kernel", lambda sm: sm == 90 or sm >= 100, "sm_90 or Blackwell")),
    "aiter": ("aiter gemm_a8w8_blockscale", _aiter),
    "triton": ("quantrt Triton block-FP8 (w8a8_triton)", _triton),
    "flashinfer_deepgemm": ("FlashInfer DeepGEMM", lambda e: _vendor(e, "flashinfer", lambda sm: sm == 90, "sm_90")),
}
FP8_AUTO_ORDER = ("deep_gemm", "flashinfer_trtllm", "cutlass", "aiter", "triton")
FP8_DEPRECATED_ENV = {"SGLANG_ENABLE_FLASHINFER_FP8_GEMM": "flashinfer_trtllm",
                      "SGLANG_SUPPORT_CUTLASS_BLOCK_FP8": "cutlass"}

FP4_BACKENDS: dict[str, tuple[str, Callable[[GemmEnv], str]]] = {
    name: (f"FlashInfer mm_fp4(backend={name.removeprefix('flashinfer_')!r})",
           lambda e: _vendor(e, "flashinfer", *_BLACKWELL))
    for name in ("flashinfer_cudnn", "flashinfer_cutlass", "flashinfer_trtllm")
}
FP4_FALLBACKS: dict[str, tuple[str, Callable[[GemmEnv], str]]] = {
    "flashinfer": ("FlashInfer mm_fp4(backend='auto')", lambda e: _vendor(e, "flashinfer", *_BLACKWELL)),
    "sgl_kernel": ("sgl-kernel cutlass_scaled_fp4_mm", lambda e: _vendor(e, "sgl_kernel", *_BLACKWELL)),
    "quantrt": ("quantrt kernels (FP4 dequantized in registers, or the reference kernel)", lambda e: ""),
}
FP4_DEPRECATED_ENV = "SGLANG_FLASHINFER_FP4_GEMM_BACKEND"


@dataclass(frozen=True)
class GemmBackendChoice:
    """What a `--fp*-gemm-backend` value resolved to: the backend, how, and what auto skipped."""

    flag: str                                    # "--fp8-gemm-backend"
    requested: str                               # the flag's value (or the deprecated variable's)
    chosen: str
    runs: str                                    # what the chosen backend runs
    skipped: tuple[tuple[str, str], ...] = ()    # (backend, why not) in auto order
    source: str = ""                             # "" or "from SGLANG_..."

    def describe(self) -> str:
        how = f"{self.requested}{f' {self.source}' if self.source else ''}"
        text = f"{self.chosen} ({how}: {self.runs})"
        if self.skipped:
            text += "; skipped " + "; ".join(f"{n}: {w}" for n, w in self.skipped)
        return text


def _available(table: Mapping[str, tuple[str, Callable[[GemmEnv], str]]], env: GemmEnv) -> list[str]:
    return [n for n, (_, check) in table.items() if not check(env)]


def _explicit(flag: str, name: str, table, env: GemmEnv, source: str, available: list[str]) -> GemmBackendChoice:
    runs, check = table[name]
    why = check(env)
    if why:
        via = f" ({source})" if source else ""
        raise ConfigError(f"{flag} {name}{via}: {why}. Available here: "
                          f"{', '.join(['auto', *available]) if available else 'auto'}")
    return GemmBackendChoice(flag, name, name, runs, (), source)


def resolve_fp8_gemm_backend(value: str, env: GemmEnv) -> GemmBackendChoice:
    """`--fp8-gemm-backend value` on this GPU; a named backend that cannot run is a ConfigError."""
    flag = "--fp8-gemm-backend"
    if value not in ("auto", *FP8_BACKENDS):
        raise ConfigError(f"invalid {flag} {value!r}; choose one of: {', '.join(['auto', *FP8_BACKENDS])}")
    available = _available(FP8_BACKENDS, env)
    source = ""
    if value == "auto":
        for var, name in FP8_DEPRECATED_ENV.items():
            if env.flag(var):
                value, source = name, f"from the deprecated {var}"
                break
    if value != "auto":
        return _explicit(flag, value, FP8_BACKENDS, env, source, available)
    skipped = []
    for name in FP8_AUTO_ORDER:
        runs, check = FP8_BACKENDS[name]
        why = check(env)
        if not why:
            return GemmBackendChoice(flag, "auto", name, runs, tuple(skipped))
        skipped.append((name, why))
    raise ConfigError(f"{flag} auto: no block-FP8 backend can run here ("
                      + "; ".join(f"{n}: {w}" for n, w in skipped) + ")")


def resolve_fp4_gemm_backend(value: str, env: GemmEnv) -> GemmBackendChoice:
    """`--fp4-gemm-backend value` on this GPU; a named backend that cannot run is a ConfigError."""
    flag = "--fp4-gemm-backend"
    if value not in ("auto", *FP4_BACKENDS):
        raise ConfigError(f"invalid {flag} {value!r}; choose one of: {', '.join(['auto', *FP4_BACKENDS])}")
    available = _available(FP4_BACKENDS, env)
    source = ""
    deprecated = env.environ.get(FP4_DEPRECATED_ENV, "")
    if value == "auto" and deprecated and deprecated != "auto":
        value = deprecated if deprecated.startswith("flashinfer_") else f"flashinfer_{deprecated}"
        source = f"from the deprecated {FP4_DEPRECATED_ENV}={deprecated}"
        if value not in FP4_BACKENDS:
            raise ConfigError(f"{FP4_DEPRECATED_ENV}={deprecated!r} names no FP4 backend; choose one of: "
                              f"{', '.join(n.removeprefix('flashinfer_') for n in FP4_BACKENDS)}")
    if value != "auto":
        return _explicit(flag, value, FP4_BACKENDS, env, source, available)
    skipped = []
    for name, (runs, check) in FP4_FALLBACKS.items():
        why = check(env)
        if not why:
            return GemmBackendChoice(flag, "auto", name, runs, tuple(skipped))
        skipped.append((name, why))
    raise AssertionError("the quantrt fallback is always available")
