"""The norm error bounds (memory_test.kernels.norm_error) against emulated TF32 and tensor-core arithmetic.

The GPU's arithmetic is emulated in float64: operands truncated or rounded to TF32 bit for bit, and fp32
accumulation that rounds toward zero after every block of products (the tensor-core model the budgets assume).
The bound computed from the emulated estimate must exceed the exact norm of the *unrounded* fp32 operands for
every sample, on adversarial inputs: rows that cancel, identical rows (coherent residuals), mantissas that lose the
most to truncation or rounding, tiny and huge scales, one row, odd shapes.
"""

from __future__ import annotations

import pytest
import torch

from memory_test.kernels import norm_error as ne
from tests.kernels.tf32_emulation import (
    CASES,
    SHAPES,
    U,
    cancelling,
    emulated_direct,
    emulated_gram,
    exact,
    gaussian,
    worst_mantissas,
)


def _budget(path, d, p, T, mode, *, tf32_on=True):
    u = U[mode] if mode else 0.0
    if path == "gram":
        return ne.gram_budget(torch.float32, torch.float32, d, p, tensor_cores_a=True, tensor_cores_g=True,
                              tf32=tf32_on, tf32_u=u)  # fmt: skip
    return ne.direct_budget(torch.float32, torch.float32, T, tensor_cores=True, tf32=tf32_on, tf32_u=u)


@pytest.mark.parametrize("mode", ["truncate", "round"])
@pytest.mark.parametrize("case", list(CASES))
def test_gram_bound_holds_for_tf32_operands_and_tensor_core_accumulation(case, mode):
    for i, (B, T, d, p) in enumerate(SHAPES):
        A, G = CASES[case](B, T, d, p, i)
        w_exact, b_exact = exact(A, G)
        w, b, dw, db = emulated_gram(A, G, mode)
        budget = _budget("gram", d, p, T, mode)
        assert (ne.upper_bound(w, budget.u_w, dw) >= w_exact).all(), (case, mode, (B, T, d, p))
        assert (ne.upper_bound(b, budget.u_b, db) >= b_exact).all(), (case, mode, (B, T, d, p))


@pytest.mark.parametrize("mode", ["truncate", "round"])
@pytest.mark.parametrize("case", list(CASES))
def test_direct_bound_holds_for_tf32_operands_and_tensor_core_accumulation(case, mode):
    for i, (B, T, d, p) in enumerate(SHAPES):
        A, G = CASES[case](B, T, d, p, i)
        w_exact, _ = exact(A, G)
        w, dw = emulated_direct(A, G, mode)
        budget = _budget("direct", d, p, T, mode)
        assert budget.u_b == 0.0  # the direct kernel's bias is an fp32 column sum on CUDA cores
        assert (ne.upper_bound(w, budget.u_w, dw) >= w_exact).all(), (case, mode, (B, T, d, p))


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("case", ["gaussian", "cancelling", "identical rows"])
def test_bf16_operands_need_only_the_accumulation_term(case, block):
    """16-bit operands enter the dot exactly: the budget is the accumulation term alone, and it suffices."""
    for i, (B, T, d, p) in enumerate(SHAPES):
        A, G = (x.bfloat16() for x in CASES[case](B, T, d, p, i))
        w_exact, b_exact = exact(A, G)
        w, b, dw, db = emulated_gram(A.float(), G.float(), None, block)
        budget = ne.gram_budget(torch.bfloat16, torch.bfloat16, d, p, tensor_cores_a=True, tensor_cores_g=True,
                                tf32=True, tf32_u=ne.TF32_TRUNCATION_U)  # fmt: skip
        assert budget.u_w == pytest.approx(ne.accumulation_u(d, True) / 2 + ne.accumulation_u(p, True) / 2, rel=1e-6)
        assert (ne.upper_bound(w, budget.u_w, dw) >= w_exact).all()
        assert (ne.upper_bound(b, budget.u_b, db) >= b_exact).all()


def test_the_emulation_bites_without_the_bound():
    """Negative control: truncated operands make the plain estimate low (the bias the bound exists for)."""
    A, G = worst_mantissas(4, 16, 24, 24)
    w_exact, _ = exact(A, G)
    w, _, _, _ = emulated_gram(A, G, "truncate")
    assert ((w_exact - w) / w_exact).min() > 2e-3  # every sample low: 4 operand factors, each ~2^-10 / 1.4
    w, _, _, _ = emulated_gram(A, G, None)
    assert ((w_exact - w) / w_exact).min() > 0  # exact operands: the truncating accumulator alone is low


def test_a_fixed_relative_margin_fails_for_cancelling_rows():
    """Why the bound has the D term: rows that cancel make the error large relative to the norm (here the estimate
    is off by ~20%), so the budget's relative factor k(u) alone falls short; with u·D it holds (tests above)."""
    A, G = cancelling(4, 16, 24, 24, 4)
    w_exact, _ = exact(A, G)
    w, _, dw, _ = emulated_gram(A, G, "truncate")
    budget = _budget("gram", 24, 24, 16, "truncate")
    assert (dw / w_exact).max() > 1e5  # D >> n²: the rows cancel
    assert (ne.upper_bound(w, budget.u_w, torch.zeros_like(dw)) < w_exact).any()
    assert (ne.upper_bound(w, budget.u_w, dw) >= w_exact).all()


def test_bound_is_tight_for_ordinary_rows():
    """Independent rows: D ≈ n², so the bound is about (1 + 2u)·n: a few 1e-3 under TF32 truncation, not 1%."""
    A, G = gaussian(8, 64, 48, 48)
    w_exact, _ = exact(A, G)
    w, _, dw, _ = emulated_gram(A, G, "truncate")
    budget = _budget("gram", 48, 48, 64, "truncate")
    excess = (ne.upper_bound(w, budget.u_w, dw) / w_exact).sqrt() - 1
    assert (excess > 0).all() and (excess < 3 * budget.u_w).all()


def test_budgets():
    assert ne.accumulation_u(1152, True) == 144 * 2.0**-23 and ne.accumulation_u(1152, False) == 0.0
    assert ne.operand_u(torch.float32, True, ne.TF32_TRUNCATION_U) == 2.0**-10
    assert ne.operand_u(torch.bfloat16, True, ne.TF32_TRUNCATION_U) == 0.0  # bf16 values are TF32 values
    ieee = ne.gram_budget(torch.float32, torch.float32, 64, 64, tensor_cores_a=False, tensor_cores_g=False,
                          tf32=False, tf32_u=ne.TF32_TRUNCATION_U)  # fmt: skip
    assert ieee.exact and ieee.key == "gram float32 ieee"
    mixed = ne.gram_budget(torch.float32, torch.bfloat16, 64, 64, tensor_cores_a=True, tensor_cores_g=True,
                           tf32=True, tf32_u=ne.TF32_ROUNDING_U)  # fmt: skip
    assert mixed.u_b == ne.accumulation_u(64, True) / 2  # G is bf16: no operand term for the bias
    assert mixed.key == "gram bfloat16/float32 tf32-rounded"
    sq = torch.tensor([4.0, 9.0])
    assert ne.upper_bound(sq, 0.0, None) is sq  # exact: the estimate itself, no copy
    torch.testing.assert_close(ne.upper_bound(sq, 0.5, torch.tensor([2.0, 0.0])), torch.tensor([30.0, 54.0]))


def test_torch_budget_is_exact_off_the_gpu_and_for_float64():
    A, G = gaussian(2, 5, 3, 4)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert ne.torch_budget("gram", A, G, dtype).exact  # CPU: IEEE BLAS
    assert ne.torch_budget("outer", A[:, :1], G[:, :1], torch.float32).key == "outer float32 ieee"


def test_incoherent_sums_are_the_gram_diagonals():
    A, G = gaussian(3, 7, 5, 4)
    dw, db = ne.incoherent_sums(A, G)
    P = torch.bmm(A.double(), A.double().transpose(1, 2)).diagonal(dim1=1, dim2=2)
    Q = torch.bmm(G.double(), G.double().transpose(1, 2)).diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(dw.double(), (P * Q).sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(db.double(), Q.sum(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("dtypes", "tf32", "two_pass", "loss", "want"),
    [
        ({torch.float32}, False, True, torch.float32, 0.0),
        ({torch.float64}, False, False, torch.float64, 0.0),
        ({torch.float32}, True, False, torch.float32, 2.0**-10),
        ({torch.bfloat16}, True, False, torch.float32, 2 * 2.0**-8 + 2.0**-16),
        ({torch.bfloat16, torch.float32}, True, True, torch.float32, 2 * 2.0**-8 + 2.0**-16),
        ({torch.bfloat16}, False, True, torch.bfloat16, 2 * 2.0**-8 + 2.0**-16 + 2.0**-8),
        ({torch.float16}, False, False, torch.float32, 2 * 2.0**-11 + 2.0**-22),
    ],
)
def test_coefficient_slack(dtypes, tf32, two_pass, loss, want):
    s, why = ne.coefficient_slack(two_pass=two_pass, dtypes=dtypes, tf32=tf32, loss_dtype=loss)
    assert s == want and why


def test_margin_switch(monkeypatch):
    assert ne.margins_enabled()
    monkeypatch.setenv(ne.MARGINS_ENV, "0")
    assert not ne.margins_enabled()
    monkeypatch.setenv(ne.MARGINS_ENV, "off")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        ne.margins_enabled()
