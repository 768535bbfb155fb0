"""DiT profiling suite: model wrapper, single-experiment runner, sweeps and plots."""
