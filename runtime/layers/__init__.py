"""Shared model layers: QuantLinear, norms, rotary embedding, paged attention."""
