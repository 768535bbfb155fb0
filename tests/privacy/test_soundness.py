"""The soundness table: model families x modes, each exact (< 1e-9 against the one-sample reference) or refused.

Every case builds a float64 model with random non-zero weights and runs one DP-SGD step (SGD, lr 1, no noise) in
each mode with C = the median per-sample norm, so some samples are clipped and some are not. "Exact" compares the
update with per-sample gradients computed one sample at a time, clipped and summed; "refused" expects the engine's
own error before any parameter moved.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from memory_test.privacy import MODES, PrivacyEngine
from memory_test.privacy.reference import clipped_sum, per_sample_gradients, per_sample_norms
from tests.privacy.soundness_models import CASES, Case

N = 5  # samples per batch
MODES_UNDER_TEST = sorted(name for name, m in MODES.items() if not m.distributed)


def per_sample_criterion(k: int):
    def criterion(pred, target):
        return (pred - target).pow(2).flatten(1).mean(1).view(-1, k).mean(1)

    criterion.reduction = "mean"
    return criterion


def _rows(args, rows, sl):
    return tuple(a[sl] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == rows else a for a in args)


def _batch(case: Case):
    rows = N * case.k
    args = case.inputs(rows, torch.Generator().manual_seed(1))
    model = case.build()
    with torch.no_grad():
        out = model(*args)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    return model, args, target


def reference(model, args, target, k: int, max_grad_norm: float):
    """(update for SGD lr 1 with a mean loss, per-sample norms), one sample at a time."""
    crit, rows = per_sample_criterion(k), N * k

    def loss_of_sample(i):
        sl = slice(i * k, (i + 1) * k)
        return crit(model(*_rows(args, rows, sl)), target[sl])[0]

    grads = per_sample_gradients(model, loss_of_sample, N)
    return [g / N for g in clipped_sum(grads, max_grad_norm)], per_sample_norms(grads)


def dp_step(model, args, target, k, max_grad_norm, mode, *, eval_after=False):
    """One DP-SGD step; returns the update of every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    loader = DataLoader(TensorDataset(torch.zeros(N)), batch_size=N)
    dp_model, dp_opt, crit, _ = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, criterion=per_sample_criterion(k),
        noise_multiplier=0.0, max_grad_norm=max_grad_norm, grad_sample_mode=mode, poisson_sampling=False,
    )  # fmt: skip
    if eval_after:
        dp_model.eval()
    crit(dp_model(*args), target).backward()
    dp_opt.step()
    return [b - p.detach() for b, p in zip(before, params)]


def rel_err(got, want) -> float:
    num = torch.sqrt(sum((g - w).pow(2).sum() for g, w in zip(got, want)))
    return (num / torch.sqrt(sum(w.pow(2).sum() for w in want))).item()


@pytest.fixture(scope="module")
def reference_cache():
    return {}


def _expected(case: Case, cache: dict):
    """(model, args, target, C, reference update), computed once per case."""
    if case.name not in cache:
        model, args, target = _batch(case)
        modes = {m: m.training for m in model.modules()}
        if case.eval_before or case.eval_after:
            model.eval()  # the reference runs as the DP step will: in eval mode
        _, norms = reference(model, args, target, case.k, 1e12)
        max_grad_norm = norms.median().item()
        assert (norms > max_grad_norm * 1.01).any() and (norms < max_grad_norm * 0.99).any(), "C clips some"
        want, _ = reference(model, args, target, case.k, max_grad_norm)
        for m, training in modes.items():
            m.training = training
        if case.eval_before:
            model.eval()
        cache[case.name] = (model, args, target, max_grad_norm, want)
    return cache[case.name]


EXACT = [c for c in CASES if c.expect is None]
REFUSED = [c for c in CASES if c.expect is not None]


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
@pytest.mark.parametrize("case", EXACT, ids=lambda c: c.name)
def test_exact(case, mode, reference_cache):
    model, args, target, max_grad_norm, want = _expected(case, reference_cache)
    got = dp_step(copy.deepcopy(model), args, target, case.k, max_grad_norm, mode, eval_after=case.eval_after)
    assert rel_err(got, want) < 1e-9


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.name)
def test_refused(case, mode):
    model, args, target = _batch(case)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(case.expect):
        dp_step(model, args, target, case.k, 1.0, mode)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters())), "no update after a refusal"
