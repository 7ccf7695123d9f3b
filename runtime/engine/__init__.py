"""The engine: requests -> scheduler -> model runner -> sampler."""
