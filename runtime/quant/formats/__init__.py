"""Built-in checkpoint formats. Importing this package registers them (one module per method)."""

from quantrt.quant.formats import (  # noqa: F401
    auto_round,
    awq,
    bitsandbytes,
    compressed_tensors,
    fp8,
    gguf,
    gptq,
    modelopt,
    modelslim,
    mxfp4,
    quark_int4fp8_moe,
    torchao,
    w8a8,
    yaml_rules,
)
