"""quantrt's native CPU extension: every `platforms/xpu/csrc/*.cpp` compiled into one torch library.

Contract (shared by every C++ file in csrc/):
- each .cpp registers its ops with `TORCH_LIBRARY_FRAGMENT(quantrt_cpu, m)` (no pybind module); Python
  calls them as `torch.ops.quantrt_cpu.<name>` after `load()` returned True. One op name is defined in
  one file only. Parallel loops use `at::parallel_for` (it follows torch.set_num_threads), never raw OpenMP.
- SIMD code sits under `#ifdef __AVX2__` with a scalar C++ path otherwise: `-mavx2 -mfma -mf16c` are
  passed only when the host reports avx2 + fma + f16c (/proc/cpuinfo, else torch's CPU capability);
  `-march=native` is never used (the build dir may be shared with a different machine).
- `load() -> bool`: idempotent and thread-safe; compiles all csrc/*.cpp (sorted) with
  `torch.utils.cpp_extension.load(..., is_python_module=False)` into
  `<repo>/.cache/cpu_ext/<hash of sources + flags + torch version>` (or `$QUANTRT_CPU_EXT_DIR/<hash>`),
  so an unchanged tree loads the cached .so in well under a second, and a changed one rebuilds (torch's
  build lock serializes concurrent processes; a lock older than 10 minutes, left by a killed build, is dropped).
- `unavailable_reason() -> str | None`: None once loaded, else why not (QUANTRT_DISABLE_CPU_EXT=1, not
  x86-64, no C++ compiler or ninja, or the build error's summary). It triggers `load()` when needed.
- `python -m quantrt.platforms.xpu.cpu_ext --build` builds it (scripts/setup.sh runs this; a failed
  build prints the reason and exits 0 unless `--strict` is given). `--status` prints the state only.
"""

from __future__ import annotations

import hashlib
import os
import platform as _pyplatform
import shutil
import sys
import threading
from pathlib import Path

LIBRARY = "quantrt_cpu"          # TORCH_LIBRARY_FRAGMENT namespace: torch.ops.quantrt_cpu.<op>
CSRC = Path(__file__).resolve().parent / "csrc"
_BASE_FLAGS = ["-O3", "-DNDEBUG", "-fno-math-errno"]   # the C++ standard is torch's own
_SIMD_FLAGS = ["-mavx2", "-mfma", "-mf16c"]

_lock = threading.Lock()
_loaded = False
_reason: str | None = None
_attempted = False


def _host_has_avx2_fma() -> bool:
    """avx2 + fma + f16c, from /proc/cpuinfo where it exists, else torch's CPU capability."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                return {"avx2", "fma", "f16c"} <= flags
    except OSError:
        pass
    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def sources() -> list[Path]:
    """The C++ files compiled into the extension, sorted."""
    return sorted(CSRC.glob("*.cpp"))


def _openmp_flags() -> list[str]:
    """-fopenmp when torch's ATen parallel backend is OpenMP: at::parallel_for is an inline template
    whose `#pragma omp parallel` runs on one thread without it (the process keeps torch's libgomp)."""
    import torch

    return ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []


def flags() -> list[str]:
    """Compiler flags for this host (SIMD flags only where the CPU has avx2 + fma + f16c)."""
    return _BASE_FLAGS + _openmp_flags() + (_SIMD_FLAGS if _host_has_avx2_fma() else [])


def build_dir(srcs: list[Path], cflags: list[str]) -> Path:
    """<root>/<hash of sources + flags + torch version>; root = $QUANTRT_CPU_EXT_DIR, else the repo's
    .cache/cpu_ext (editable install), else ~/.cache/quantrt/cpu_ext."""
    import torch

    h = hashlib.sha256()
    for p in [*srcs, *sorted(CSRC.glob("*.h"))]:      # the shared headers too: a change there rebuilds
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(cflags).encode() + torch.__version__.encode() + sys.version.encode())
    env_root = os.environ.get("QUANTRT_CPU_EXT_DIR")
    repo = CSRC.parents[2]
    if env_root:
        root = Path(env_root)
    elif (repo / "pyproject.toml").is_file():
        root = repo / ".cache" / "cpu_ext"
    else:
        root = Path.home() / ".cache" / "quantrt" / "cpu_ext"
    return root / h.hexdigest()[:16]


def _precheck() -> str | None:
    """Why the extension cannot be built here, before trying; None when a build may be attempted."""
    if os.environ.get("QUANTRT_DISABLE_CPU_EXT", "") not in ("", "0"):
        return "disabled by QUANTRT_DISABLE_CPU_EXT=1"
    machine = _pyplatform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return f"CPU architecture {machine} is not x86-64 (the native kernels target x86-64 only)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler: `{cxx}` is not on PATH (install g++ or set CXX)"
    if shutil.which("ninja") is None:
        return "ninja is not on PATH (apt-get install ninja-build, or pip install ninja)"
    if not sources():
        return f"no C++ sources in {CSRC}"
    return None


def _drop_stale_lock(lock: Path, max_age_s: float = 600.0) -> None:
    """torch's build baton (`lock` in the build dir) outlives a build that was killed, and every later
    load would wait on it forever; a build here takes well under a minute, so an old lock is stale."""
    import time

    try:
        if time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()
    except FileNotFoundError:
        pass


def _summarize(err: BaseException) -> str:
    """The compiler's error lines (at most 5) from a failed build, else the exception's last line."""
    text = f"{err}\n{getattr(err, 'output', '') or ''}"
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() and ln.strip()]
    picked = lines[:5] or [text.strip().splitlines()[-1] if text.strip() else type(err).__name__]
    return "build failed: " + " | ".join(picked)[:800]


def load() -> bool:
    """Build (once, cached on disk) and load the extension; True when torch.ops.quantrt_cpu is usable."""
    global _loaded, _reason, _attempted
    if _attempted:
        return _loaded
    with _lock:
        if _attempted:
            return _loaded
        why = _precheck()
        if why is None:
            try:
                import torch
                from torch.utils import cpp_extension

                srcs, cflags = sources(), flags()
                bdir = build_dir(srcs, cflags)
                bdir.mkdir(parents=True, exist_ok=True)
                _drop_stale_lock(bdir / "lock")
                cpp_extension.load(name="quantrt_cpu_ext", sources=[str(p) for p in srcs],
                                   extra_cflags=cflags, extra_ldflags=_openmp_flags(),
                                   build_directory=str(bdir),
                                   is_python_module=False, verbose=False)
                getattr(torch.ops, LIBRARY)  # namespace exists once the library registered its ops
                _loaded = True
            except Exception as e:  # compiler/linker errors arrive as RuntimeError/CalledProcessError
                why = _summarize(e)
        _reason = why
        _attempted = True
        return _loaded


def unavailable_reason() -> str | None:
    """None when the extension is loaded, else one line saying why it is not (builds it if needed)."""
    load()
    return None if _loaded else _reason


def status() -> str:
    """One line for `quantrt env`: loaded (with flags) or the reason it is not."""
    why = unavailable_reason()
    simd = "avx2+fma" if "-mavx2" in flags() else "scalar"
    return f"loaded ({simd}, {len(sources())} sources)" if why is None else f"unavailable: {why}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m quantrt.platforms.xpu.cpu_ext",
                                 description="Build/load quantrt's native CPU extension.")
    ap.add_argument("--build", action="store_true", help="build (or load the cached build) and report")
    ap.add_argument("--status", action="store_true", help="same as --build (a cached build loads fast)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when the extension is unavailable")
    args = ap.parse_args(argv)
    line = status()
    print(f"quantrt CPU extension: {line}")
    return 1 if args.strict and not _loaded else 0


if __name__ == "__main__":
    raise SystemExit(main())
