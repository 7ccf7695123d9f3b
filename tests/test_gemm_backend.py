"""`--fp8-gemm-backend` / `--fp4-gemm-backend`: SGLang's choices and auto order, checked against a
hand-built environment (GPU generation, installed packages, variables), and the messages."""

from __future__ import annotations

import pytest

from quantrt import choices
from quantrt.errors import ConfigError
from quantrt.platform.interface import DeviceCapability
from quantrt.platforms.cuda.gemm_backends import (
    FP4_BACKENDS,
    FP8_BACKENDS,
    GemmEnv,
    resolve_fp4_gemm_backend,
    resolve_fp8_gemm_backend,
)
from quantrt.platforms.cuda.platform import CudaPlatform
from quantrt.platforms.xpu.cpu_platform import CpuPlatform
from quantrt.server_args import ServerArgs

H100 = GemmEnv(90, packages=frozenset({"triton"}))
B200_ALL = GemmEnv(100, packages=frozenset({"triton", "deep_gemm", "flashinfer", "sgl_kernel"}))


def test_choices_are_sglangs() -> None:
    assert set(choices.FP8_GEMM_BACKENDS) == {"auto", *FP8_BACKENDS}
    assert set(choices.FP4_GEMM_BACKENDS) == {"auto", *FP4_BACKENDS}


def test_auto_on_an_h100_without_vendor_packages_picks_triton_and_says_why() -> None:
    c = resolve_fp8_gemm_backend("auto", H100)
    assert c.chosen == "triton"
    assert [n for n, _ in c.skipped] == ["deep_gemm", "flashinfer_trtllm", "cutlass", "aiter"]
    assert c.describe() == (
        "triton (auto: quantrt Triton block-FP8 (w8a8_triton)); skipped "
        "deep_gemm: needs the `deep_gemm` package, which is not installed; "
        "flashinfer_trtllm: needs a Blackwell GPU (sm_100+), this GPU is sm_90; "
        "cutlass: needs the `sgl_kernel` package, which is not installed; aiter: needs ROCm (HIP)")
    f = resolve_fp4_gemm_backend("auto", H100)
    assert f.chosen == "quantrt"
    assert f.skipped == (("flashinfer", "needs a Blackwell GPU (sm_100+), this GPU is sm_90"),
                         ("sgl_kernel", "needs a Blackwell GPU (sm_100+), this GPU is sm_90"))


def test_named_backend_that_cannot_run_names_what_is_missing_and_what_is_available() -> None:
    with pytest.raises(ConfigError) as e:
        resolve_fp8_gemm_backend("deep_gemm", H100)
    assert str(e.value) == ("--fp8-gemm-backend deep_gemm: needs the `deep_gemm` package, which is not "
                            "installed. Available here: auto, triton")
    with pytest.raises(ConfigError, match=r"--fp8-gemm-backend cutlass: needs sm_90 or Blackwell, this GPU is "
                                          r"sm_89\. Available here: auto, triton"):
        resolve_fp8_gemm_backend("cutlass", GemmEnv(89, packages=frozenset({"triton", "sgl_kernel"})))
    with pytest.raises(ConfigError, match="flashinfer_deepgemm: needs the `flashinfer` package"):
        resolve_fp8_gemm_backend("flashinfer_deepgemm", H100)
    with pytest.raises(ConfigError, match=r"--fp4-gemm-backend flashinfer_cutlass: needs a Blackwell GPU "
                                          r"\(sm_100\+\), this GPU is sm_90\. Available here: auto$"):
        resolve_fp4_gemm_backend("flashinfer_cutlass", H100)
    with pytest.raises(ConfigError, match="--fp8-gemm-backend triton: needs the `triton` package"):
        resolve_fp8_gemm_backend("triton", GemmEnv(90))
    with pytest.raises(ConfigError, match="invalid --fp8-gemm-backend 'cublas'; choose one of: auto, deep_gemm"):
        resolve_fp8_gemm_backend("cublas", H100)


def test_installed_vendor_packages_are_still_refused_without_an_adapter() -> None:
    c = resolve_fp8_gemm_backend("auto", B200_ALL)
    assert c.chosen == "triton"
    assert dict(c.skipped)["deep_gemm"] == "`deep_gemm` is installed, but quantrt has no adapter for it yet"
    with pytest.raises(ConfigError, match="flashinfer_trtllm: `flashinfer` is installed, but quantrt has no adapter"):
        resolve_fp8_gemm_backend("flashinfer_trtllm", B200_ALL)
    off = GemmEnv(90, packages=B200_ALL.packages, environ={"SGLANG_ENABLE_JIT_DEEPGEMM": "0"})
    assert dict(resolve_fp8_gemm_backend("auto", off).skipped)["deep_gemm"] == "SGLANG_ENABLE_JIT_DEEPGEMM is off"


def test_rocm_aiter_and_deprecated_variables() -> None:
    rocm = GemmEnv(94, hip=True, packages=frozenset({"triton", "aiter"}), environ={"SGLANG_USE_AITER": "1"})
    c = resolve_fp8_gemm_backend("auto", rocm)
    assert c.chosen == "aiter" and dict(c.skipped)["cutlass"] == "needs an NVIDIA GPU with sm_90 or Blackwell"
    assert resolve_fp8_gemm_backend("auto", GemmEnv(94, hip=True, packages=frozenset({"triton"}))).chosen == "triton"
    with pytest.raises(ConfigError, match="--fp8-gemm-backend aiter: needs SGLANG_USE_AITER=1"):
        resolve_fp8_gemm_backend("aiter", GemmEnv(94, hip=True, packages=frozenset({"triton", "aiter"})))
    dep = GemmEnv(90, packages=frozenset({"triton"}), environ={"SGLANG_SUPPORT_CUTLASS_BLOCK_FP8": "1"})
    with pytest.raises(ConfigError, match=r"--fp8-gemm-backend cutlass \(from the deprecated "
                                          r"SGLANG_SUPPORT_CUTLASS_BLOCK_FP8\): needs the `sgl_kernel` package"):
        resolve_fp8_gemm_backend("auto", dep)
    assert resolve_fp8_gemm_backend("triton", dep).chosen == "triton"     # the flag wins over the variable
    fp4 = GemmEnv(90, environ={"SGLANG_FLASHINFER_FP4_GEMM_BACKEND": "cudnn"})
    with pytest.raises(ConfigError, match=r"flashinfer_cudnn \(from the deprecated "
                                          r"SGLANG_FLASHINFER_FP4_GEMM_BACKEND=cudnn\): needs a Blackwell"):
        resolve_fp4_gemm_backend("auto", fp4)
    with pytest.raises(ConfigError, match="SGLANG_FLASHINFER_FP4_GEMM_BACKEND='fast' names no FP4 backend"):
        resolve_fp4_gemm_backend("auto", GemmEnv(90, environ={"SGLANG_FLASHINFER_FP4_GEMM_BACKEND": "fast"}))


def test_platform_check_config_resolves_and_refuses() -> None:
    h100 = CudaPlatform(capability=DeviceCapability(9, 0), device_name="fake H100")
    h100.check_config(ServerArgs(model_path="/m"))
    assert h100.gemm_backends["fp8"].requested == "auto"
    with pytest.raises(ConfigError, match="--fp4-gemm-backend flashinfer_trtllm: needs a Blackwell GPU"):
        h100.check_config(ServerArgs(model_path="/m", fp4_gemm_backend="flashinfer_trtllm"))
    with pytest.raises(ConfigError, match="--fp8-gemm-backend triton selects a CUDA/ROCm GEMM library; on cpu "
                                          "only auto applies"):
        CpuPlatform().check_config(ServerArgs(model_path="/m", fp8_gemm_backend="triton"))
