"""Checkpoint reading: model config, safetensors streaming, GGUF, and routing tensors into the model."""
