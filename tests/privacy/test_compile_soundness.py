"""The soundness guards hold for compiled DP models too (``dp_model.compile``): a sample of the soundness table.

Eval mode is recorded, functional ties and batch-independent inputs are refused, sequence-first layers (exact in
the eager engine) are refused by the compiled path, which records batch-first layers only.
"""

from __future__ import annotations

import copy

import pytest
import torch

from memory_test.privacy import PrivacyConfigError
from tests.privacy.soundness_models import CASES, MODES_UNDER_TEST, _batch, _expected, dp_step, rel_err

AOT = {"backend": "aot_eager"}
BY_NAME = {c.name: c for c in CASES}
EXACT = ["eval_after_make_private", "eval_before_make_private", "one_submodule_in_eval", "conv2d_reflect"]
REFUSED = ["gpt_tied_functionally", "linear_on_table_T_equal_B", "dpmha_seq_first"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def reference_cache():
    return {}


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
@pytest.mark.parametrize("name", EXACT)
def test_compiled_exact(name, mode, reference_cache):
    case = BY_NAME[name]
    model, args, target, max_grad_norm, want = _expected(case, reference_cache)
    got = dp_step(
        copy.deepcopy(model), args, target, case.k, max_grad_norm, mode, eval_after=case.eval_after, compile_kwargs=AOT
    )
    assert rel_err(got, want) < 1e-9


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
@pytest.mark.parametrize("name", REFUSED)
def test_compiled_refused(name, mode):
    model, args, target = _batch(BY_NAME[name])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PrivacyConfigError):
        dp_step(model, args, target, 1, 1.0, mode, compile_kwargs=AOT)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
