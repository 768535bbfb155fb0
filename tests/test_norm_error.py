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
from memory_test.kernels.flash_norms_reference import linear_sq_norms_reference

U = {"truncate": ne.TF32_TRUNCATION_U, "round": ne.TF32_ROUNDING_U}
SHAPES = [(3, 1, 5, 7), (2, 2, 3, 17), (2, 37, 33, 5), (1, 67, 17, 48), (4, 16, 24, 24)]


def tf32(x: torch.Tensor, mode: str) -> torch.Tensor:
    """fp32 -> TF32 (as float64): drop the 13 low mantissa bits, or round them to nearest (ties away)."""
    bits = x.float().contiguous().view(torch.int32)
    if mode == "round":
        bits = bits + 0x1000
    return (bits & ~0x1FFF).view(torch.float32).double()


def _toward_zero_fp32(x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    over = x32.double().abs() > x.abs()
    return torch.where(over, torch.nextafter(x32, torch.zeros_like(x32)), x32).double()


def tensor_core_dot(X: torch.Tensor, Y: torch.Tensor, block: int) -> torch.Tensor:
    """Σ_k X[..., k] Y[..., k] with exact products and an fp32 accumulator truncated after every block."""
    acc = torch.zeros(torch.broadcast_shapes(X.shape, Y.shape)[:-1], dtype=torch.float64)
    for lo in range(0, X.shape[-1], block):
        acc = _toward_zero_fp32(acc + (X[..., lo : lo + block] * Y[..., lo : lo + block]).sum(-1))
    return acc


def emulated_gram(A, G, mode: str | None, block: int = ne.ACCUMULATION_BLOCK):
    """(w, b, D_w, D_b) as the Gram kernel computes them: TF32 operands (mode None: exact), tensor-core Grams."""
    a = tf32(A, mode) if mode else A.double()
    g = tf32(G, mode) if mode else G.double()
    P = tensor_core_dot(a.unsqueeze(2), a.unsqueeze(1), block)
    Q = tensor_core_dot(g.unsqueeze(2), g.unsqueeze(1), block)
    Pd, Qd = P.diagonal(dim1=1, dim2=2), Q.diagonal(dim1=1, dim2=2)
    return (P * Q).sum(dim=(1, 2)), Q.sum(dim=(1, 2)), (Pd * Qd).sum(1), Qd.sum(1)


def emulated_direct(A, G, mode: str | None, block: int = ne.ACCUMULATION_BLOCK):
    """||AᵀG||² with TF32 operands and the reduction over rows on tensor cores (D from fp32 row norms, as torch)."""
    a = tf32(A, mode) if mode else A.double()
    g = tf32(G, mode) if mode else G.double()
    M = tensor_core_dot(a.transpose(1, 2).unsqueeze(2), g.transpose(1, 2).unsqueeze(1), block)  # (B, d, p)
    return M.square().sum(dim=(1, 2)), ne.incoherent_sums(A, G)[0].double()


def exact(A, G):
    return linear_sq_norms_reference(A.double(), G.double(), with_bias=True, path="direct")


# ----- adversarial inputs (fp32) ------------------------------------------------------------------------------


def gaussian(B, T, d, p, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, d, generator=g) * scale).float(), (torch.randn(B, T, p, generator=g) * scale).float()


def cancelling(B, T, d, p, seed=0):
    """Rows in pairs: the same input, output gradients g and -g(1 + 1e-3 z): the gradient is tiny, D is not."""
    A, G = gaussian(B, (T + 1) // 2, d, p, seed)
    z = torch.randn(G.shape, generator=torch.Generator().manual_seed(seed + 1))
    A2 = torch.stack([A, A * (1 + 1e-4)], dim=2).reshape(B, -1, d)[:, :T]
    G2 = torch.stack([G, -G * (1 + 1e-3 * z)], dim=2).reshape(B, -1, p)[:, :T]
    return A2.contiguous(), G2.contiguous()


def identical_rows(B, T, d, p, seed=0):
    """Every row the same: the rounding residuals of all rows align (the coherent case)."""
    A, G = gaussian(B, 1, d, p, seed)
    return A.expand(B, T, d).contiguous(), G.expand(B, T, p).contiguous()


def worst_mantissas(B, T, d, p, seed=0, low_bits=0x1FFF):
    """Positive values whose 13 dropped mantissa bits are ``low_bits``: 0x1FFF loses the most to truncation,
    0x0FFF to rounding down; all the same sign, so every product shrinks together."""
    g = torch.Generator().manual_seed(seed)

    def make(*shape):
        exponent = torch.randint(120, 134, shape, generator=g, dtype=torch.int32) << 23
        high = torch.randint(0, 1 << 10, shape, generator=g, dtype=torch.int32) << 13
        return (exponent | high | low_bits).view(torch.float32)

    return make(B, T, d), make(B, T, p)


CASES = {
    "gaussian": gaussian,
    "cancelling": cancelling,
    "identical rows": identical_rows,
    "truncation-worst mantissas": worst_mantissas,
    "rounding-down mantissas": lambda *s: worst_mantissas(*s, low_bits=0x0FFF),
    "tiny": lambda *s: gaussian(*s, scale=1e-6),
    "huge": lambda *s: gaussian(*s, scale=1e6),
}


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
