"""Built-in checkpoint formats. Importing this package registers them (one module per method)."""

from quantrt.quant.formats import (  # noqa: F401
    fp8,
    gguf,  # noqa: F401
    modelslim,
    quark_int4fp8_moe,
    torchao,  # noqa: F401
    w8a8,  # noqa: F401
)
