"""Measurement code for the DiT profiling suite: timing, memory peaks, environment, records.

Nothing here knows about differential privacy. ``records`` is pure standard library so that the plotting script
can use it without importing torch; import the other modules explicitly (they import torch lazily or directly).
"""
