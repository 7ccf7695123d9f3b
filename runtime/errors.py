"""Errors a user can cause. Every message names the problem and the options."""

from __future__ import annotations

from collections.abc import Iterable


class QuantrtError(Exception):
    """Base class of every error quantrt raises on bad input."""


class ConfigError(QuantrtError, ValueError):
    """A flag, a config file or a checkpoint config is wrong or contradicts another."""


class NotSupportedYet(QuantrtError, NotImplementedError):
    """A recognised option whose behaviour is not built yet."""


class CheckpointError(QuantrtError, ValueError):
    """A checkpoint is missing tensors, has unused or malformed tensors, or cannot be read."""


class PlatformError(QuantrtError, RuntimeError):
    """Platform probing or selection failed, or a method is not allowed on this platform."""


def choices_error(what: str, value: object, options: Iterable[str]) -> ConfigError:
    """`--what` got `value`; list every accepted option."""
    opts = ", ".join(sorted(str(o) for o in options))
    return ConfigError(f"invalid {what} {value!r}; choose one of: {opts}")
