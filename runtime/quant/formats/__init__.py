"""Built-in checkpoint formats. Importing this package registers them (one module per method)."""

from quantrt.quant.formats import fp8, modelslim, quark_int4fp8_moe  # noqa: F401
from quantrt.quant.formats import w8a8  # noqa: F401
