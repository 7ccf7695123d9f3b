"""Platform probes, resolution, plugins and the method x platform checks — all on CPU, no hardware.

Environments are faked by injecting probe tables and fake torch modules into `resolve_platform` and the
probes; nothing in quantrt is monkeypatched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from quantrt.choices import QUANTIZATION_CHOICES
from quantrt.errors import ConfigError, PlatformError
from quantrt.platform import DeviceCapability, Platform, current_platform, resolve_platform
from quantrt.platform.checks import allowed_methods, check_quantization_allowed, min_capability
from quantrt.platforms import ascend, cuda, rocm, xpu
from quantrt.platforms.ascend.platform import AscendPlatform
from quantrt.platforms.cuda.platform import CudaPlatform
from quantrt.platforms.rocm.platform import RocmPlatform, capability_from_arch
from quantrt.platforms.xpu.cpu_platform import CpuPlatform

NOTHING: dict = {"cuda": lambda: None, "rocm": lambda: None, "npu": lambda: None, "xpu": lambda: None}
NO_PLUGINS: list = []


def fake_torch(hip: str | None = None, cuda_ok: bool = False, xpu_ok: bool | None = None) -> SimpleNamespace:
    t = SimpleNamespace(version=SimpleNamespace(hip=hip), cuda=SimpleNamespace(is_available=lambda: cuda_ok))
    if xpu_ok is not None:
        t.xpu = SimpleNamespace(is_available=lambda: xpu_ok)
    return t


def probes_for(t: SimpleNamespace, npu_ok: bool = False) -> dict:
    """The real probe functions, run against a fake torch (and a fake torch_npu when npu_ok)."""
    npu_torch = SimpleNamespace(npu=SimpleNamespace(is_available=lambda: True))
    find_spec = (lambda name: object()) if npu_ok else (lambda name: None)
    return {
        "cuda": lambda: cuda.probe(t),
        "rocm": lambda: rocm.probe(t),
        "npu": lambda: ascend.probe(find_spec, lambda name: npu_torch),
        "xpu": lambda: xpu.probe(t),
    }


def resolve(device: str | None = None, probes: dict | None = None, plugins: list | None = None) -> Platform:
    return resolve_platform(
        device, builtin_probes=probes or NOTHING, plugin_entry_points=plugins or NO_PLUGINS
    )


def entry(name: str, obj: object) -> SimpleNamespace:
    return SimpleNamespace(name=name, load=lambda: obj)


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QUANTRT_PLATFORM", raising=False)


# --- probes under faked environments -------------------------------------------------------------


def test_cuda_build_resolves_cuda() -> None:
    p = resolve(probes=probes_for(fake_torch(cuda_ok=True)))
    assert isinstance(p, CudaPlatform) and p.name == "cuda" and p.dist_backend == "nccl"


def test_hip_version_means_rocm_not_cuda() -> None:
    t = fake_torch(hip="6.2.41133", cuda_ok=True)
    assert cuda.probe(t) is None
    p = resolve(probes=probes_for(t))
    assert type(p) is RocmPlatform and p.name == "rocm" and p.dist_backend == "nccl"


def test_torch_npu_present_resolves_ascend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_DEVICE_BACKEND_AUTOLOAD", raising=False)
    p = resolve(probes=probes_for(fake_torch(), npu_ok=True))
    assert isinstance(p, AscendPlatform) and p.device_type == "npu" and p.dist_backend == "hccl"
    assert os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] == "0"  # set before torch_npu was imported
    assert p.capability() is None


def test_broken_torch_npu_is_skipped_not_raised() -> None:
    def broken_import(name: str) -> object:
        raise ImportError("libascendcl.so: cannot open shared object file")

    assert ascend.probe(lambda name: object(), broken_import) is None
    assert ascend.probe(lambda name: None) is None


def test_xpu_available_resolves_xpu() -> None:
    p = resolve(probes=probes_for(fake_torch(xpu_ok=True)))
    assert p.name == "xpu" and p.dist_backend == "xccl"
    assert xpu.probe(fake_torch()) is None  # torch without torch.xpu


def test_two_builtins_at_once_is_a_clear_error() -> None:
    probes = {**NOTHING, "cuda": lambda: cuda.CLASS_PATH, "npu": lambda: ascend.CLASS_PATH}
    with pytest.raises(PlatformError, match=r"exactly one platform must be active.*cuda, npu"):
        resolve(probes=probes)


def test_nothing_found_falls_back_to_cpu() -> None:
    p = resolve(probes=probes_for(fake_torch()))
    assert isinstance(p, CpuPlatform) and p.dist_backend == "gloo" and p.is_cpu


# --- --device / QUANTRT_PLATFORM ------------------------------------------------------------------


def test_explicit_cpu_wins_over_a_gpu() -> None:
    assert isinstance(resolve("cpu", probes_for(fake_torch(cuda_ok=True))), CpuPlatform)


def test_env_override_and_device_argument_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    probes = probes_for(fake_torch(cuda_ok=True), npu_ok=True)
    monkeypatch.setenv("QUANTRT_PLATFORM", "ascend")  # alias of npu
    assert resolve(probes=probes).name == "npu"
    assert resolve("cuda", probes).name == "cuda"  # --device beats the environment
    assert resolve("auto", probes=probes_for(fake_torch())).name == "cpu"


def test_unavailable_name_says_so_and_lists_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTRT_PLATFORM", "rocm")
    with pytest.raises(PlatformError, match=r"'rocm' was requested .* not available.*available: cuda, cpu"):
        resolve(probes=probes_for(fake_torch(cuda_ok=True)))


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(
        PlatformError, match=r"unknown platform 'tpu'.*choose one of: ascend, cpu, cuda, npu, rocm, xpu"
    ):
        resolve("tpu")


# --- out-of-tree plugins (injected entry points) -------------------------------------------------


class PluginPlatform(Platform):
    name = "plugdev"


def test_one_plugin_wins_over_builtins() -> None:
    plugins = [entry("plugdev", lambda: PluginPlatform), entry("absent", lambda: None)]
    p = resolve(probes={**NOTHING, "cuda": lambda: cuda.CLASS_PATH}, plugins=plugins)
    assert type(p) is PluginPlatform


def test_plugin_entry_point_may_be_the_class_itself() -> None:
    assert type(resolve("plugdev", plugins=[entry("plugdev", PluginPlatform)])) is PluginPlatform


def test_two_plugins_is_an_error_naming_them() -> None:
    plugins = [entry("a", PluginPlatform), entry("b", lambda: PluginPlatform)]
    with pytest.raises(PlatformError, match=r"2 out-of-tree plugins are: a, b"):
        resolve(plugins=plugins)


def test_plugin_class_must_subclass_platform() -> None:
    with pytest.raises(PlatformError, match="not a subclass of quantrt Platform"):
        resolve(plugins=[entry("bad", lambda: "collections:OrderedDict")])


def test_crashing_plugin_skipped_in_auto_but_fatal_when_named() -> None:
    def boom() -> str:
        raise RuntimeError("driver missing")

    assert resolve(plugins=[entry("boom", boom)]).name == "cpu"
    with pytest.raises(PlatformError, match="'boom' failed to activate: RuntimeError: driver missing"):
        resolve("boom", plugins=[entry("boom", boom)])


def test_current_platform_is_cached_per_name() -> None:
    assert current_platform("cpu") is current_platform("cpu")
    assert isinstance(current_platform("cpu"), CpuPlatform)


# --- platform classes without hardware -----------------------------------------------------------


@pytest.mark.parametrize(
    "arch,cap", [("gfx942:sramecc+:xnack-", "9.4"), ("gfx950", "9.5"), ("gfx90a", "9.0"), ("gfx1100", "11.0")]
)
def test_rocm_capability_from_arch(arch: str, cap: str) -> None:
    assert str(capability_from_arch(arch)) == cap
    assert str(RocmPlatform(arch=arch).capability()) == cap


def test_rocm_fp8_flavour() -> None:
    assert RocmPlatform(arch="gfx942").fp8_dtype() == torch.float8_e4m3fnuz
    assert torch.float8_e4m3fnuz in RocmPlatform(arch="gfx942").supported_dtypes()
    assert RocmPlatform(arch="gfx950").fp8_dtype() == torch.float8_e4m3fn
    assert CudaPlatform(capability=DeviceCapability(9, 0)).fp8_dtype() == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="not a gfx architecture"):
        capability_from_arch("sm90")


def test_cuda_dtypes_follow_capability() -> None:
    assert torch.float8_e4m3fn in CudaPlatform(capability=DeviceCapability(8, 9)).supported_dtypes()
    ampere = CudaPlatform(capability=DeviceCapability(8, 0)).supported_dtypes()
    assert torch.bfloat16 in ampere and torch.float8_e4m3fn not in ampere
    assert CudaPlatform().default_mem_fraction() == 0.88
    assert CudaPlatform().attention_backends() == ["triton", "torch_sdpa"]


def test_cpu_platform_reads_proc_files(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Fancy CPU 3000 @ 3.0GHz\n")
    (tmp_path / "meminfo").write_text(
        "MemTotal:       16384000 kB\nMemFree: 100 kB\nMemAvailable:    8192000 kB\n"
    )
    p = CpuPlatform(cpuinfo=tmp_path / "cpuinfo", meminfo=tmp_path / "meminfo", use_psutil=False)
    assert p.device_name() == "Fancy CPU 3000 @ 3.0GHz"
    assert p.memory_info() == (8192000 * 1024, 16384000 * 1024)
    assert p.num_threads() == torch.get_num_threads()
    d = CpuPlatform().describe()
    assert d["platform"] == "cpu" and d["memory_total_gib"] > 0 and d["linear_kernels"][-1] == "reference"


# --- method x platform checks --------------------------------------------------------------------


def q(method: str | None) -> SimpleNamespace:
    return SimpleNamespace(quantization=method)


def test_rocm_allow_list() -> None:
    mi300 = RocmPlatform(arch="gfx942")
    for ok in ("awq", "gptq", "fp8", "compressed-tensors", "w8a8_fp8", "petit_nvfp4", "quark", "mxfp4"):
        mi300.check_config(q(ok))
    with pytest.raises(PlatformError) as err:
        mi300.check_config(q("gptq_marlin"))
    msg = str(err.value)
    assert msg.startswith("gptq_marlin quantization is currently not supported in ROCm.")
    assert "Methods allowed on ROCm: awq, fp8, gptq," in msg and "bitsandbytes" not in msg


def test_capability_error_uses_sglang_wording() -> None:
    a100 = CudaPlatform(capability=DeviceCapability(8, 0))
    with pytest.raises(PlatformError) as err:
        check_quantization_allowed(a100, q("w8a8_fp8"))
    assert str(err.value) == (
        "The quantization method w8a8_fp8 is not supported for the current GPU. "
        "Minimum capability: 89. Current capability: 80."
    )
    a100.check_config(q("fp8"))  # SM80 runs fp8 as W8A16
    h100 = CudaPlatform(capability=DeviceCapability(9, 0))
    h100.check_config(q("w8a8_fp8"))
    with pytest.raises(PlatformError, match="Minimum capability: 100. Current capability: 90."):
        h100.check_config(q("modelopt_fp4"))


def test_npu_skips_capability_and_cpu_allows_everything() -> None:
    AscendPlatform().check_config(q("modelslim"))
    assert allowed_methods(CpuPlatform()) == list(QUANTIZATION_CHOICES)
    CpuPlatform().check_config(q("modelopt_fp4"))
    CpuPlatform().check_config(q(None))


def test_unknown_method_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"invalid --quantization 'int3'; choose one of: .*awq"):
        CpuPlatform().check_config(q("int3"))


def test_min_capability_table() -> None:
    assert min_capability("awq") == 75 and min_capability("gptq") == 60
    assert min_capability("modelopt_fp4") == 100 and min_capability("modelslim") == 0
    assert min_capability("nope") is None
    assert all(min_capability(m) is not None for m in QUANTIZATION_CHOICES)


# --- a real, pip-installed out-of-tree plugin ----------------------------------------------------

FIXTURE = Path(__file__).parent / "fixtures" / "fake_platform_plugin"
PROBE_SNIPPET = (
    "from quantrt.platform import resolve_platform, available_platforms; "
    "p = resolve_platform(); print(p.name, type(p).__name__, p.device_name(), available_platforms())"
)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the fake plugin into a private folder (copied first so the repo stays clean)."""
    root = tmp_path_factory.mktemp("plugin")
    src, site = root / "src", root / "site"
    shutil.copytree(FIXTURE, src)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*cmd, "--target", str(site), str(src)], check=True, capture_output=True, timeout=300)
    return site


def run_with_plugin(site: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("QUANTRT_PLATFORM", "FAKEDEV_ABSENT")}
    full_env.update(PYTHONPATH=str(site), **env)
    return subprocess.run(
        [sys.executable, "-c", PROBE_SNIPPET], env=full_env, capture_output=True, text=True, timeout=120
    )


def test_installed_plugin_by_name_and_auto(plugin_site: Path) -> None:
    for env in ({"QUANTRT_PLATFORM": "fakedev"}, {}):
        out = run_with_plugin(plugin_site, **env)
        assert out.returncode == 0, out.stderr
        # the host's own built-ins (none in CI, cuda on a GPU box) come between the plugin and cpu
        assert out.stdout.startswith("fakedev FakeDevPlatform Fake Device 9000 ['fakedev', ")
        assert out.stdout.rstrip().endswith("'cpu']")


def test_installed_plugin_absent(plugin_site: Path) -> None:
    out = run_with_plugin(plugin_site, FAKEDEV_ABSENT="1")
    assert out.returncode == 0 and "fakedev" not in out.stdout, out.stderr  # the host's own platform
    out = run_with_plugin(plugin_site, FAKEDEV_ABSENT="1", QUANTRT_PLATFORM="fakedev")
    assert out.returncode != 0
    assert "'fakedev' was requested (--device / QUANTRT_PLATFORM) but is not available" in out.stderr
