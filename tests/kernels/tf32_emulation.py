"""TF32 and tensor-core arithmetic emulated in float64, and adversarial inputs: shared by the norm-error tests and the
kernel tests (operands truncated or rounded to TF32 bit for bit; fp32 accumulation that rounds toward zero after every
block of products, the tensor-core model the budgets assume)."""

from __future__ import annotations

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
