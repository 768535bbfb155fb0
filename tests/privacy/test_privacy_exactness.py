"""Every mode's update equals the one-sample-at-a-time float64 reference (clipped, summed, divided by the batch)."""

from __future__ import annotations

import copy

import pytest
import torch

from memory_test.privacy import MODES
from tests.conftest import TinyDiT, make_batch, reference_update, rel_err
from tests.conftest import dp_update as _dp_update

N = 4
SINGLE_PROCESS_MODES = sorted(name for name, m in MODES.items() if not m.distributed)
ALL_MODES = SINGLE_PROCESS_MODES + ["hooks"]


@pytest.fixture(scope="module")
def tiny_model():
    return TinyDiT().double().train()


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_update_matches_reference(tiny_model, mode, reduction):
    batch = make_batch(N)
    _, norms = reference_update(tiny_model, batch, N, 1, 1e9, reduction)
    max_grad_norm = norms.median().item()  # some samples clipped, some not
    assert (norms > max_grad_norm * 1.01).any() and (norms < max_grad_norm * 0.99).any()
    want, _ = reference_update(tiny_model, batch, N, 1, max_grad_norm, reduction)
    got = _dp_update(tiny_model, batch, 1, max_grad_norm, mode, reduction)
    # Every parameter with a non-zero reference update moves (embedders included; the key bias is exactly 0
    # because softmax ignores a shift shared by all keys).
    assert all(g.abs().sum() > 0 for g, w in zip(got, want) if w.abs().sum() > 1e-12)
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_noise_multiplicity_rows_form_one_sample(tiny_model, mode):
    k = 3
    batch = make_batch(N, k=k)
    _, norms = reference_update(tiny_model, batch, N, k, 1e9, "mean")
    max_grad_norm = norms.median().item()
    want, _ = reference_update(tiny_model, batch, N, k, max_grad_norm, "mean")
    got = _dp_update(tiny_model, batch, k, max_grad_norm, mode, "mean")
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
def test_unclipped_equals_plain_gradient(tiny_model, mode):
    """With a huge C nothing is clipped: the update is the ordinary mean gradient."""
    batch = make_batch(N, seed=7)
    x, t, y, target = batch
    model = copy.deepcopy(tiny_model)
    loss = (model(x, t, y) - target).pow(2).flatten(1).mean(1).mean()
    want = torch.autograd.grad(loss, list(model.parameters()))
    got = _dp_update(tiny_model, batch, 1, 1e12, mode, "mean")
    assert rel_err(got, want) <= 1e-9


@pytest.mark.parametrize("mode", ["bookkeeping", "flash_clip_bk"])
@pytest.mark.parametrize("stack_bytes", [1, 12288, 1 << 30])  # no stacking, runs of 2 layers, whole runs
def test_bookkeeping_stacked_layers_match_reference(tiny_model, monkeypatch, mode, stack_bytes):
    """Same-shape Linears normed and clipped together (in runs bounded by STACK_BYTES) give the reference update."""
    from memory_test.privacy import grad_sample_module

    monkeypatch.setattr(grad_sample_module, "STACK_BYTES", stack_bytes)
    batch = make_batch(N, k=2)
    _, norms = reference_update(tiny_model, batch, N, 2, 1e9, "mean")
    max_grad_norm = norms.median().item()
    want, _ = reference_update(tiny_model, batch, N, 2, max_grad_norm, "mean")
    got = _dp_update(tiny_model, batch, 2, max_grad_norm, mode, "mean")
    assert rel_err(got, want) <= 1e-6
