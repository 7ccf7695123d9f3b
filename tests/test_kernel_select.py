"""Kernel selection on CPU: the fp8 kernel serves FloatWeight, rejections explain themselves."""

import logging

import torch

from quantrt.platform.interface import Platform
from quantrt.platforms.xpu.cpu_kernels import CPU_LINEAR_KERNELS, CpuFp8EmulatedKernel
from quantrt.quant.kernel import LinearKernel, LinearSpec, select_linear_kernel
from quantrt.quant.kernels.reference import ReferenceLinearKernel
from quantrt.quant.quantize import quantize_fp8
from quantrt.quant.weights import ActKind, ActScheme, IntWeight

E4 = torch.float8_e4m3fn


class _CpuLike(Platform):
    name = "cpu"

    def linear_kernels(self) -> list[type[LinearKernel]]:
        return list(CPU_LINEAR_KERNELS)


def test_fp8_selects_cpu_kernel() -> None:
    spec = LinearSpec(quantize_fp8(torch.randn(8, 16), "channel"), ActScheme(ActKind.DYNAMIC_TOKEN, E4),
                      torch.bfloat16)
    choice = select_linear_kernel(spec, _CpuLike())
    assert choice.kernel is CpuFp8EmulatedKernel and choice.explain().startswith("cpu_fp8_emulated")


def test_int_weight_falls_back_with_reason(caplog) -> None:
    iw = IntWeight(torch.zeros(8, 16, dtype=torch.int8), torch.ones(8, 1), 8, 16)
    spec = LinearSpec(iw, ActScheme(), torch.float64)  # no CPU integer kernel computes in float64
    with caplog.at_level(logging.WARNING):
        choice = select_linear_kernel(spec, _CpuLike())
    assert choice.kernel is ReferenceLinearKernel
    assert choice.explain().startswith("reference (skipped cpu_dense_onednn: weight is IntWeight, not DenseWeight; "
                                       "cpu_fp8_emulated: weight is IntWeight, not FloatWeight; ")
    assert "cpu_int_emulated: compute dtype torch.float64 is not float32/bfloat16/float16" in choice.explain()
    assert "using the reference kernel" in caplog.text


def test_precise_rejections() -> None:
    fw = quantize_fp8(torch.randn(8, 16), "tensor")
    plat = _CpuLike()
    ok, why = CpuFp8EmulatedKernel.can_implement(
        LinearSpec(fw, ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8), torch.bfloat16), plat)
    assert not ok and why == "activations are torch.int8, not fp8"
    ok, why = CpuFp8EmulatedKernel.can_implement(LinearSpec(fw, ActScheme(), torch.float64), plat)
    assert not ok and why == "compute dtype torch.float64 is not float32/bfloat16/float16"
