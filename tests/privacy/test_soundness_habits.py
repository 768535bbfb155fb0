"""Ordinary training habits, in every mode: each gives the one-sample-at-a-time reference update or is refused.

Gradient accumulation (two DP backward passes, one step) and BatchMemoryManager's physical batches; a plain
``loss.backward()`` on the model's output (not through the DP criterion); an optimizer that leaves trainable
parameters out; a NaN sample in a physical batch whose step was skipped.
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memory_test.privacy import (
    MODES,
    CoverageError,
    CriterionError,
    NonFiniteSampleError,
    PrivacyConfigError,
    PrivacyEngine,
)
from memory_test.privacy.reference import clipped_sum, per_sample_gradients
from tests.conftest import per_sample_mse

MODES_UNDER_TEST = sorted(name for name, m in MODES.items() if not m.distributed)
F64 = torch.float64
C = 0.05  # below most of these samples' norms, above some


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=F64), torch.randn(n, 3, generator=gen, dtype=F64)


def _private(net, mode, dataset, batch_size, params=None, **kwargs):
    optimizer = torch.optim.SGD(params if params is not None else net.parameters(), lr=1.0)
    engine = PrivacyEngine()
    model, opt, crit, loader = engine.make_private(
        module=net, optimizer=optimizer, data_loader=DataLoader(dataset, batch_size=batch_size),
        criterion=per_sample_mse,
        noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode, poisson_sampling=False, **kwargs,
    )  # fmt: skip
    return engine, model, opt, crit, loader


def _reference_sum(net, x, target):
    """Σ_i clip(g_i), one sample at a time."""
    grads = per_sample_gradients(net, lambda i: per_sample_mse(net(x[i : i + 1]), target[i : i + 1])[0], len(x))
    return clipped_sum(grads, C)


def _update(net, before):
    return [b - p.detach() for b, p in zip(before, net.parameters())]


def _assert_close(got, want):
    err = torch.sqrt(sum((g - w).pow(2).sum() for g, w in zip(got, want)))
    assert (err / torch.sqrt(sum(w.pow(2).sum() for w in want))).item() < 1e-9


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_gradient_accumulation_divides_by_every_sample_and_accounts_every_pass(mode):
    """Two DP backward passes, then one step: the mean over 2B clipped samples, accounted at twice the sample rate
    (Opacus hooks' accumulation). Before the fix: the update was twice too large and epsilon computed for q."""
    net = _net()
    (x1, t1), (x2, t2) = _data(5, 1), _data(5, 2)
    want = [w / 10 for w in _reference_sum(copy.deepcopy(net), torch.cat([x1, x2]), torch.cat([t1, t2]))]
    engine, model, opt, crit, loader = _private(net, mode, TensorDataset(torch.zeros(20)), 5)
    before = [p.detach().clone() for p in net.parameters()]
    crit(model(x1), t1).backward()
    crit(model(x2), t2).backward()
    opt.step()
    _assert_close(_update(net, before), want)
    [(sigma, sample_rate, steps)] = engine.accountant.history
    assert sample_rate == 2 / len(loader) and steps == 1


def _physical_batches(net, mode, x, target, physical):
    """One logical batch of len(x) samples run as BatchMemoryManager physical batches of ``physical`` rows."""
    engine, model, opt, crit, loader = _private(net, mode, TensorDataset(x, target), len(x))
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=opt) as batches:
        for xb, tb in batches:
            opt.zero_grad()
            crit(model(xb), tb).backward()
            opt.step()
            if not opt._is_last_step_skipped:
                break
    return engine, model, opt, crit


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_batch_memory_manager_equals_the_logical_batch(mode):
    net = _net()
    x, target = _data(8, 3)
    want = [w / 8 for w in _reference_sum(copy.deepcopy(net), x, target)]
    before = [p.detach().clone() for p in net.parameters()]
    engine, *_ = _physical_batches(net, mode, x, target, physical=3)
    _assert_close(_update(net, before), want)
    [(_, sample_rate, steps)] = engine.accountant.history
    assert sample_rate == 1.0 and steps == 1


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_nan_sample_in_a_skipped_physical_batch_refuses_the_logical_step(mode):
    """zero_grad between physical batches used to forget the first batch's NaN rows: a silently all-NaN model."""
    net = _net()
    x, target = _data(8, 3)
    x[1, 2] = float("nan")
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(NonFiniteSampleError, match=r"rows \[1\]"):
        _physical_batches(net, mode, x, target, physical=4)
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_refused_logical_step_is_dropped_by_zero_grad(mode):
    net = _net()
    engine, model, opt, crit, _ = _private(net, mode, TensorDataset(torch.zeros(8)), 8)
    x, target = _data(4, 4)
    x[0, 0] = float("nan")
    opt.signal_skip_step(do_skip=True)
    crit(model(x), target).backward()
    opt.step()  # skipped: the NaN rows are now in the accumulated gradient
    opt.zero_grad()
    crit(model(_data(4, 5)[0]), _data(4, 5)[1]).backward()
    with pytest.raises(NonFiniteSampleError):
        opt.step()
    opt.zero_grad()  # drops the whole logical batch
    x, target = _data(4, 6)
    crit(model(x), target).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert len(engine.accountant.history) == 1


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
@pytest.mark.parametrize("also_dp", [False, True])
def test_plain_backward_outside_the_criterion_refuses_the_step(mode, also_dp):
    """``loss.backward()`` on a loss not made by the DP criterion writes unclipped gradients: refused at the step,
    alone or mixed with a DP backward (before the fix: noised and applied, epsilon reported)."""
    net = _net()
    engine, model, opt, crit, _ = _private(net, mode, TensorDataset(torch.zeros(8)), 4)
    before = [p.detach().clone() for p in net.parameters()]
    x, target = _data(4, 7)
    per_sample_mse(model(x), target).mean().backward()
    if also_dp:
        crit(model(x), target).backward()
    with pytest.raises(CoverageError, match="outside the DP criterion"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert engine.accountant.history == []
    opt.zero_grad()
    crit(model(x), target).backward()
    opt.step()
    assert len(engine.accountant.history) == 1


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_gradient_of_the_inputs_only_is_not_refused(mode):
    """torch.autograd.grad w.r.t. the input (e.g. a saliency map) writes no p.grad: the DP step still runs."""
    net = _net()
    _, model, opt, crit, _ = _private(net, mode, TensorDataset(torch.zeros(8)), 4)
    x, target = _data(4, 8)
    x.requires_grad_(True)
    torch.autograd.grad(model(x).sum(), x)
    crit(model(x.detach()), target).backward()
    opt.step()


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_optimizer_leaving_out_trainable_parameters_is_refused(mode):
    """Their per-sample gradients would count in the norm (over-clipping the rest) and never be trained."""
    net = _net()
    with pytest.raises(PrivacyConfigError, match=r"not in the optimizer: 0\.weight, 0\.bias"):
        _private(net, mode, TensorDataset(torch.zeros(8)), 4, params=net[2].parameters())
    net[0].requires_grad_(False)  # frozen instead: fine
    _private(net, mode, TensorDataset(torch.zeros(8)), 4, params=net[2].parameters())


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
@pytest.mark.parametrize("kwargs", [{"retain_graph": True}, {"create_graph": True}, {"inputs": "params"}])
def test_backward_arguments_of_the_dp_loss_are_refused_with_the_engine_error(mode, kwargs):
    """torch.Tensor.backward's arguments would change what the engine's own backward differentiates or keeps."""
    net = _net()
    _, model, opt, crit, _ = _private(net, mode, TensorDataset(torch.zeros(8)), 4)
    x, target = _data(4, 9)
    loss = crit(model(x), target)
    kwargs = {k: list(net.parameters()) if v == "params" else v for k, v in kwargs.items()}
    with pytest.raises(CriterionError, match="takes no arguments"):
        loss.backward(**kwargs)
    crit(model(x), target).backward()  # the ordinary call still works afterwards
    opt.step()
