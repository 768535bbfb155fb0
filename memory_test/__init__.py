"""Exact, fast DP-SGD for diffusion transformers, and the suite that measures it."""
