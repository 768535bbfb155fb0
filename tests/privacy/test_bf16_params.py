"""bf16/fp16 *parameters* (``model.to(dtype)``, not autocast), every single-process mode, against the float64
one-sample-at-a-time reference computed from the same 16-bit weights and inputs, upcast.

Where the engine's clipped sum may differ from the float64 reference, term by term (u: the dtype's unit roundoff,
``norm_error.UNIT_ROUNDOFF``; s: the error model's coefficient slack for the mode, ``norm_error.coefficient_slack``):

- the model's own 16-bit arithmetic: every activation and gradient is rounded to 16 bits, whatever computes the
  per-sample gradients. It depends on the model's depth, not on the engine, so it is measured here with the
  reference method itself run in the same precision (plain autograd, one sample at a time, clipped in float64):
  ``e_model``. The engine's batched forward rounds the same values, up to the fp32 accumulation order of its matmuls;
- the clip margin: the engine clips with f·n, f = (1 + s)·sqrt(k(u_max)), and u_max = 0 on a CPU (fp32 Grams of
  16-bit operands are exact), so f = 1 + s. With every sample clipped (C below the smallest norm) the margin scales
  the whole sum by 1/f: a relative change of 1 - 1/f;
- the rounding of each clipped contribution (c_i cast to 16 bits, c_i·x rounded; two-pass: the recomputed second
  backward): at most s of that contribution's norm by the error model, so at most s·W of the sum, W = Σ_i‖c_i g_i‖ /
  ‖Σ_i c_i g_i‖ (W = 1 if the contributions were parallel, about sqrt(n) if orthogonal);
- the stored sum: ``p.grad`` is a 16-bit tensor, each element rounded once more: u.

So ``rel_err(engine, reference) <= e_model + (1 - 1/f) + s·W + u``. Each sample's own clipped contribution (a
batch of one sample) is at most C up to that last rounding: ``‖p.grad‖ <= C·(1 + u)``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from memory_test.kernels import norm_error
from memory_test.privacy import MODES
from memory_test.privacy.modes import TWO_PASS
from memory_test.privacy.reference import clipped_sum, per_sample_gradients, per_sample_norms
from tests.conftest import TinyDiT, make_batch, make_private, per_sample_criterion, rel_err

MODES_UNDER_TEST = sorted(name for name, m in MODES.items() if not m.distributed)
DTYPES = (torch.bfloat16, torch.float16)
N, K = 4, 2  # samples, rows per sample (noise multiplicity)


def _lowered(batch, dtype):
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in batch)


def _per_sample(model, batch, n):
    """One-sample-at-a-time gradients in the model's own precision, upcast to float64."""
    x, t, y, target = batch
    crit = per_sample_criterion(K, "sum")

    def loss_of_sample(i):
        rows = slice(i * K, (i + 1) * K)
        return crit(model(x[rows], t[rows], y[rows]), target[rows])[0]

    return [[g.double() for g in sample] for sample in per_sample_gradients(model, loss_of_sample, n)]


@functools.cache
def _case(dtype):
    """(16-bit model, 16-bit batch, float64 per-sample gradients at the same values upcast, 16-bit ones)."""
    model = TinyDiT().to(dtype)
    batch = _lowered(make_batch(N, k=K), dtype)
    exact = _per_sample(copy.deepcopy(model).double(), _lowered(batch, torch.float64), N)
    return model, batch, exact, _per_sample(copy.deepcopy(model), batch, N)


def _engine_sum(model, batch, mode, C, n):
    """p.grad after one DP backward (the clipped sum Σ_i c_i g_i, before noise and scaling), and the engine."""
    model = copy.deepcopy(model)
    dp_model, _, crit, _ = make_private(model, mode, per_sample_criterion(K, "mean"), n, max_grad_norm=C)
    x, t, y, target = batch
    crit(dp_model(x, t, y), target).backward()
    return [p.grad.double() for p in model.parameters()], dp_model


def _slack(mode, dtype) -> float:
    two_pass = MODES[mode].strategy == TWO_PASS
    return norm_error.coefficient_slack(two_pass=two_pass, dtypes={dtype}, tf32=False, loss_dtype=dtype)[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_clipped_sum_is_within_the_error_model_of_the_float64_reference(mode, dtype):
    model, batch, exact, low = _case(dtype)
    C = 0.5 * per_sample_norms(exact).min().item()  # every sample clipped: the margin is a 1/f scaling
    got, dp_model = _engine_sum(model, batch, mode, C, N)
    u, s = norm_error.UNIT_ROUNDOFF[dtype], _slack(mode, dtype)
    f = dp_model.norm_error_margin["clip_factor"]
    assert f == pytest.approx(1 + s, rel=1e-12)  # CPU: exact Grams of 16-bit operands, the slack alone

    want = clipped_sum(exact, C)
    e_model = rel_err(clipped_sum(low, C), want)
    contributions = sum(min(1.0, C / (n + 1e-6)) * n for n in per_sample_norms(exact).tolist())
    W = contributions / torch.sqrt(sum(w.pow(2).sum() for w in want)).item()
    err = rel_err(got, want)
    assert err <= e_model + (1 - 1 / f) + s * W + u, (err, e_model, f, s, W)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_each_clipped_sample_alone_adds_at_most_c(mode, dtype):
    """A batch of one sample: p.grad is its whole clipped contribution, as stored (16 bits); C below its norm.
    The samples with the smallest and the largest norm (every one of the four takes twice as long)."""
    model, batch, exact, _ = _case(dtype)
    norms = per_sample_norms(exact)
    for i in (norms.argmin().item(), norms.argmax().item()):
        C = 0.5 * norms[i].item()
        one = tuple(x[i * K : (i + 1) * K] for x in batch)
        got, _ = _engine_sum(model, one, mode, C, 1)
        total = torch.sqrt(sum(g.pow(2).sum() for g in got)).item()
        assert total <= C * (1 + norm_error.UNIT_ROUNDOFF[dtype]), (i, total / C)
        assert total >= C * (1 - 2 * _slack(mode, dtype))  # clipped to C / f, not to nothing


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_a_noisy_step_runs_and_keeps_the_parameters_dtype(mode, dtype):
    model = TinyDiT().to(dtype)
    dp_model, opt, crit, _ = make_private(model, mode, per_sample_criterion(K, "mean"), N, noise_multiplier=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    x, t, y, target = _lowered(make_batch(N, k=K), dtype)
    crit(dp_model(x, t, y), target).backward()
    opt.step()
    params = list(model.parameters())
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in params)
    assert sum((b != p).sum().item() for b, p in zip(before, params)) > 0.9 * sum(p.numel() for p in params)
