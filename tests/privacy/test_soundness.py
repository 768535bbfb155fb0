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

from tests.privacy.soundness_models import CASES, MODES_UNDER_TEST, _batch, _expected, dp_step, rel_err


@pytest.fixture(scope="module")
def reference_cache():
    return {}


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
