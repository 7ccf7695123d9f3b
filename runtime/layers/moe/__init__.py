"""Mixture-of-experts: routing (routing.py), expert math (experts.py), the FusedMoE layer (layer.py)."""
