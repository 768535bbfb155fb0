"""The wrapped model's public report (``stats()``, ``reset_peaks()``): what profilers read instead of its attributes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from memory_test.privacy import EngineStats
from tests.conftest import TinyDiT, make_batch
from tests.conftest import make_private as _make_private


def _step(dp_model, crit, optimizer):
    x, t, y, target = make_batch(4, dtype=torch.float32)
    crit(dp_model(x, t, y), target).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", ["ghost", "bookkeeping"])
def test_stats_report_the_cache_peak_paths_and_backend_and_reset(mode):
    dp_model, optimizer, crit, _ = _make_private(TinyDiT(), mode=mode)
    _step(dp_model, crit, optimizer)
    stats = dp_model.stats()
    assert isinstance(stats, EngineStats) and stats.cache_peak_bytes == dp_model.dp_cache_peak_bytes > 0
    trainable_layers = {
        n for n, m in dp_model._module.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))
    }
    assert set(stats.norm_paths) == trainable_layers
    assert sum(stats.norm_path_counts.values()) == len(stats.norm_paths)
    assert stats.kernel_backend == "torch" and stats.flash_tf32_rounding is None  # CPU: no Triton kernels
    assert stats.norm_error_margin is None or isinstance(stats.norm_error_margin, dict)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.cache_peak_bytes = 0
    stats.norm_paths.clear()  # a copy: the engine's own map is untouched
    assert dp_model.stats().norm_paths
    dp_model.reset_peaks()  # between steps the caches hold nothing: the peak restarts at 0
    assert dp_model.stats().cache_peak_bytes == 0
    _step(dp_model, crit, optimizer)
    assert dp_model.stats().cache_peak_bytes == stats.cache_peak_bytes  # the same step: the same peak
    values = dataclasses.asdict(dp_model.stats())
    assert not any(isinstance(v, torch.Tensor) for v in values.values())  # nothing about samples
