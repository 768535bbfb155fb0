"""Measurement for the DiT profiling suite and the scripts: step timing, memory peaks, breakdown, environment.

Torch-side measurement only: nothing here knows about differential privacy (a caller supplies its own memory
parts, e.g. the DP engine's caches) or about records (``memory_test.records`` turns these numbers into one). Import
the modules explicitly; they import torch.
"""
