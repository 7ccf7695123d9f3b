"""Quantization: canonical weights, formats (checkpoint layouts), kernels (how to multiply), detection.

Import the submodules you need (`quantrt.quant.weights`, `.format`, `.kernel`, `.merge`, `.quantize`,
`.detect`); this package imports nothing itself so that `import quantrt` stays cheap.
"""
