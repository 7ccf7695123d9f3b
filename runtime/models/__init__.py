"""Model architectures (one file per family), registered lazily by HF name."""
