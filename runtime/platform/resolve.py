"""Which platform is active: --device / QUANTRT_PLATFORM, else out-of-tree plugins, else built-ins, else CPU.

Probes and plugins are looked up lazily; nothing here runs at `import quantrt`. Tests inject
`builtin_probes` (name -> zero-arg probe) and `plugin_entry_points` (objects with `.name` and `.load()`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from quantrt.errors import PlatformError
from quantrt.platform.interface import Platform

log = logging.getLogger(__name__)

ENV_VAR = "QUANTRT_PLATFORM"
PLUGIN_GROUP = "quantrt.platforms"
Probe = Callable[[], Any]  # returns "module:Class", a Platform subclass, or None
_CACHE: dict[str, Platform] = {}


def _load_ref(ref: str) -> Any:
    """'pkg.mod:attr' (or 'pkg.mod.attr') -> the object."""
    module, sep, attr = ref.partition(":")
    if not sep:
        module, _, attr = ref.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def default_builtin_probes() -> dict[str, Probe]:
    """The built-in probes in resolution order (cuda, rocm, npu, xpu), loaded lazily."""
    from quantrt.platforms import BUILTIN_PROBES

    return {name: (lambda ref=ref: _load_ref(ref)()) for name, ref in BUILTIN_PROBES.items()}


def _plugin_probes(entry_points: Iterable[Any] | None) -> dict[str, Probe]:
    """Out-of-tree plugins: each entry point is a Platform subclass or a zero-arg activate function."""
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=PLUGIN_GROUP)

    def activate(ep: Any) -> Any:
        obj = ep.load()
        return obj if isinstance(obj, type) else obj()

    return {ep.name: (lambda ep=ep: activate(ep)) for ep in entry_points}


def _platform_class(name: str, found: Any) -> type[Platform]:
    cls = _load_ref(found) if isinstance(found, str) else found
    if not (isinstance(cls, type) and issubclass(cls, Platform)):
        raise PlatformError(
            f"platform {name!r} resolved to {found!r}, which is not a subclass of quantrt Platform"
        )
    return cls


def _cpu_class() -> type[Platform]:
    from quantrt.platforms import CPU_PLATFORM

    return _platform_class("cpu", CPU_PLATFORM)


def _run(name: str, probe: Probe, strict: bool) -> Any:
    """Run one probe; a crashing plugin is an error when asked for by name, else a logged skip."""
    try:
        return probe()
    except Exception as exc:
        if strict:
            raise PlatformError(f"platform {name!r} failed to activate: {type(exc).__name__}: {exc}") from exc
        log.warning(
            "platform plugin %r failed to activate (%s: %s); skipping it", name, type(exc).__name__, exc
        )
        return None


def available_platforms(
    builtin_probes: Mapping[str, Probe] | None = None, plugin_entry_points: Iterable[Any] | None = None
) -> list[str]:
    """Names of every platform whose probe succeeds here (cpu always included, last)."""
    probes = {**_plugin_probes(plugin_entry_points), **(builtin_probes or default_builtin_probes())}
    return [name for name, probe in probes.items() if _run(name, probe, strict=False)] + ["cpu"]


def resolve_platform(
    device: str | None = None,
    builtin_probes: Mapping[str, Probe] | None = None,
    plugin_entry_points: Iterable[Any] | None = None,
) -> Platform:
    """Resolve and instantiate the active platform (see the module docstring for the order)."""
    from quantrt.platforms import ALIASES

    builtins = dict(builtin_probes) if builtin_probes is not None else default_builtin_probes()
    plugins = _plugin_probes(plugin_entry_points)
    requested = (device or os.environ.get(ENV_VAR) or "").strip().lower()
    if requested and requested != "auto":
        name = ALIASES.get(requested, requested)
        if name == "cpu":
            return _cpu_class()()
        probe = builtins.get(name) or plugins.get(name)
        if probe is None:
            known = sorted({"cpu", "ascend", *builtins, *plugins})
            raise PlatformError(
                f"unknown platform {requested!r} (--device / {ENV_VAR}); choose one of: {', '.join(known)}"
            )
        found = _run(name, probe, strict=True)
        if not found:
            avail = available_platforms(builtins, plugin_entry_points)
            raise PlatformError(
                f"platform {requested!r} was requested (--device / {ENV_VAR}) but is not available on this "
                f"machine; available: {', '.join(avail)}"
            )
        return _platform_class(name, found)()
    for table, kind in ((plugins, "out-of-tree plugin"), (builtins, "built-in platform")):
        active = {name: found for name, probe in table.items() if (found := _run(name, probe, strict=False))}
        if len(active) > 1:
            raise PlatformError(
                f"exactly one platform must be active, but {len(active)} {kind}s are: {', '.join(active)}; "
                f"pick one with --device or {ENV_VAR}"
            )
        if active:
            ((name, found),) = active.items()
            return _platform_class(name, found)()
    return _cpu_class()()


def current_platform(device: str | None = None) -> Platform:
    """The active platform, resolved once per requested name (argument, else QUANTRT_PLATFORM, else auto)."""
    key = (device or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if key not in _CACHE:
        _CACHE[key] = resolve_platform(device)
    return _CACHE[key]
