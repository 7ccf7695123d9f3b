"""Intel XPU: probe and platform under a faked torch.xpu, the XCCL backend, and the Triton kernels shared with
CUDA run as the XPU kernels (under the Triton interpreter: no Intel GPU here, NOT run on hardware)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from quantrt.errors import PlatformError
from quantrt.platform.resolve import resolve_platform
from quantrt.platforms.xpu import CLASS_PATH, probe
from quantrt.platforms.xpu.platform import XpuPlatform
from quantrt.platforms.xpu.xpu_kernels import XPU_LINEAR_KERNELS, XpuTritonW8A8Kernel, XpuTritonWNA16Kernel
from quantrt.quant.kernel import LinearSpec, select_linear_kernel
from quantrt.quant.kernels.reference import ReferenceLinearKernel
from quantrt.quant.quantize import quantize_fp8
from quantrt.quant.weights import WEIGHT_ONLY, ActKind, ActScheme, IntWeight, ScaleGranularity

ROOT = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16


def _fake_torch(available: bool | None) -> SimpleNamespace:
    if available is None:
        return SimpleNamespace()                                       # a torch built without XPU
    return SimpleNamespace(xpu=SimpleNamespace(is_available=lambda: available))


def test_probe_under_a_faked_torch_xpu():
    assert probe(_fake_torch(True)) == CLASS_PATH
    assert probe(_fake_torch(False)) is None
    assert probe(_fake_torch(None)) is None


def test_xpu_platform_reads_torch_xpu(monkeypatch):
    fake = SimpleNamespace(device_count=lambda: 2, mem_get_info=lambda: (3 * 2**30, 64 * 2**30),
                           get_device_name=lambda: "Intel(R) Data Center GPU Max 1550", synchronize=lambda: None)
    monkeypatch.setattr(torch, "xpu", fake)
    p = XpuPlatform()
    d = p.describe()
    assert d["platform"] == "xpu" and d["device_count"] == 2 and d["dist_backend"] == "xccl"
    assert d["memory_total_gib"] == 64.0 and d["device"].startswith("Intel(R) Data Center GPU Max")
    assert d["linear_kernels"] == ["xpu_triton_wna16", "xpu_triton_w8a8_int8", "reference"]
    assert p.device() == torch.device("xpu", 0) and p.capability() is None


def test_xpu_and_cuda_at_once_is_a_clear_error():
    probes = {"cuda": lambda: "quantrt.platforms.cuda.platform:CudaPlatform", "xpu": lambda: CLASS_PATH}
    with pytest.raises(PlatformError, match="exactly one platform must be active, but 2 built-in platforms are: "
                                            "cuda, xpu"):
        resolve_platform(builtin_probes=probes)
    assert type(resolve_platform(builtin_probes={"xpu": lambda: CLASS_PATH})).__name__ == "XpuPlatform"


def _int4(n: int, k: int, g: int, zero: bool | str) -> IntWeight:
    """zero False: signed codes; True: integer zero points; "offset": float offsets (GGUF Q4_1 mins), plain or
    with act-order (the split path: integer zero plus the residual-offset term)."""
    torch.manual_seed(0)
    codes = torch.randint(0 if zero else -8, 16 if zero else 8, (n, k)).to(torch.uint8 if zero else torch.int8)
    scale = torch.rand(n, k // g) * 0.02 + 1e-3
    if zero in ("offset", "offset_act_order"):
        g_idx = (torch.randperm(k) // g).to(torch.int32) if zero == "offset_act_order" else None
        return IntWeight(codes, scale, 4, g, offset=-(torch.rand(n, k // g) * 8 + 0.5) * scale, g_idx=g_idx)
    z = torch.randint(6, 10, (n, k // g), dtype=torch.int32) if zero else None
    return IntWeight(codes, scale, 4, g, zero=z)


@pytest.mark.parametrize("m", [3, 64])
@pytest.mark.parametrize("zero", [False, True, "offset", "offset_act_order"])
def test_shared_wna16_triton_kernel_serves_xpu(m, zero):
    spec = LinearSpec(_int4(64, 256, 32 if zero == "offset" else 128, zero), WEIGHT_ONLY, BF16)
    assert select_linear_kernel(spec, XpuPlatform()).kernel is XpuTritonWNA16Kernel
    k = XpuTritonWNA16Kernel.prepare(spec, XpuPlatform())
    x, b = torch.randn(m, 256).to(BF16), torch.randn(64).to(BF16)
    got, want = k.apply(x, b).float(), ReferenceLinearKernel(spec).apply(x, b).float()
    assert ((got - want).abs().max() / want.abs().max()) < 1e-2


def test_shared_w8a8_int8_kernel_serves_xpu_and_fp8_is_declined():
    torch.manual_seed(1)
    w = torch.randn(48, 64) * 0.05
    s = w.abs().amax(1, keepdim=True) / 127
    spec = LinearSpec(IntWeight((w / s).round().to(torch.int8), s, 8, 64),
                      ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8), BF16)
    assert select_linear_kernel(spec, XpuPlatform()).kernel is XpuTritonW8A8Kernel
    k = XpuTritonW8A8Kernel.prepare(spec, XpuPlatform())
    x = torch.randn(5, 64).to(BF16)
    got, want = k.apply(x, None).float(), ReferenceLinearKernel(spec).apply(x, None).float()
    assert ((got - want).abs().max() / want.abs().max()) < 1e-2
    fp8 = LinearSpec(quantize_fp8(w, ScaleGranularity.CHANNEL), ActScheme(ActKind.DYNAMIC_TOKEN,
                                                                          torch.float8_e4m3fn), BF16)
    choice = select_linear_kernel(fp8, XpuPlatform())
    assert choice.kernel is ReferenceLinearKernel
    assert "only int8 W8A8 is shared with XPU (no fp8 matrix units" in choice.explain()


def test_kernels_need_an_xpu_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    spec = LinearSpec(_int4(64, 256, 128, False), WEIGHT_ONLY, BF16)
    assert XpuTritonWNA16Kernel.can_implement(spec, XpuPlatform()) == (False, "weight is on cpu, not an XPU")
    fp32 = LinearSpec(spec.weight, WEIGHT_ONLY, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "float16/bfloat16" in XpuTritonWNA16Kernel.can_implement(fp32, XpuPlatform())[1]
    assert [k.name for k in XPU_LINEAR_KERNELS] == ["xpu_triton_wna16", "xpu_triton_w8a8_int8"]


def test_ipex_is_not_used_and_the_docs_say_so():
    sources = [p for d in ("runtime", "platforms") for p in (ROOT / d).rglob("*.py")]
    assert sources and not any("import intel_extension_for_pytorch" in p.read_text() for p in sources)
    doc = (ROOT / "docs" / "PLATFORMS.md").read_text()
    assert "IPEX" in doc and "retired" in doc
