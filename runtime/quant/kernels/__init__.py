"""Portable kernels (the reference kernel); platform kernels live under quantrt.platforms.<name>."""
