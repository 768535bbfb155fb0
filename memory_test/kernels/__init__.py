"""Triton per-sample-norm kernels, each beside its launcher and its torch reference."""
