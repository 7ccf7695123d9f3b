"""Checkpoint formats: one class per quantization method, registered once by name.

A format parses its config, says which tensors it expects for each linear shard, and converts the
loaded tensors into a canonical quantized weight (quantrt.quant.weights). Formats never mention a
device or an SM version; kernels and platforms decide how to run what a format produces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from quantrt.errors import ConfigError
from quantrt.quant.weights import ActScheme, QuantizedWeight

if TYPE_CHECKING:
    from quantrt.server_args import ServerArgs


class QuantFormat(ABC):
    """One quantization method. Instances hold the parsed config of one model."""

    name: ClassVar[str]
    online: ClassVar[bool] = False  # True: quantizes float checkpoints at load time

    @classmethod
    @abstractmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> QuantFormat:
        """Parse the checkpoint's quantization_config ({} for online methods)."""

    @abstractmethod
    def is_quantized(self, prefix: str) -> bool:
        """False for layers the checkpoint leaves unquantized (ignore lists, lm_head ...)."""

    @abstractmethod
    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        """(required, optional) tensor suffixes for the linear at `prefix`, e.g. {"weight", "weight_scale"}."""

    @abstractmethod
    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor],
                    shape: tuple[int, int]) -> QuantizedWeight:
        """Turn the loaded tensors of one linear (shape [N, K]) into a canonical weight."""

    @abstractmethod
    def act_scheme(self, prefix: str) -> ActScheme:
        """How activations entering this linear are quantized."""

    def output_bias(self, prefix: str) -> torch.Tensor | None:
        """A float bias [N] the format folds into this linear's output (msModelSlim W8A8 `quant_bias`), added
        to the layer's own bias; None for most formats. Valid after make_weight(prefix, ...)."""
        return None

    def norm_biases(self) -> frozenset[str]:
        """Prefixes of the RMSNorms that carry an additive bias `<prefix>.bias` in this checkpoint
        (msModelSlim anti-outlier); the loader enables exactly these before routing tensors."""
        return frozenset()

    def describe(self) -> str:
        return self.name

    def finish_loading(self) -> None:
        """Called once after every layer is loaded: a format may check what it saw (unused YAML rules)."""
        return None


_FORMATS: dict[str, type[QuantFormat]] = {}


def register_format(cls: type[QuantFormat]) -> type[QuantFormat]:
    """Class decorator. A name may be registered once."""
    if cls.name in _FORMATS:
        raise ConfigError(f"quantization format {cls.name!r} is already registered by "
                          f"{_FORMATS[cls.name].__module__}.{_FORMATS[cls.name].__qualname__}")
    _FORMATS[cls.name] = cls
    return cls


def _load_builtin_formats() -> None:
    import quantrt.quant.formats  # noqa: F401  (registers the built-in formats)


def get_format(name: str) -> type[QuantFormat]:
    """The format class for `name`; unknown = error listing the registered ones."""
    _load_builtin_formats()
    try:
        return _FORMATS[name]
    except KeyError:
        from quantrt.errors import choices_error

        raise choices_error("quantization format", name, _FORMATS) from None


def registered_formats() -> list[str]:
    _load_builtin_formats()
    return sorted(_FORMATS)
