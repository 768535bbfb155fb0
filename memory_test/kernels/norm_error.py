"""Upper bounds on per-sample squared gradient norms computed in reduced precision, and the clip coefficient's slack.

DP-SGD's sensitivity is C only if no sample's contribution to the summed gradient has norm above C. The engine
clips with c_i = C / (n_i + 1e-6) (Opacus' rule), where n_i is a *computed* norm. Two things can break the bound:

* the norm is computed low: Triton's TF32 dot truncates fp32 operands to 10 mantissa bits (a bias of about -7e-4
  on the norm), cuBLAS rounds them, and tensor cores truncate their fp32 accumulation (a bias of a few 1e-6 even
  with exact bf16 operands);
* the contribution is formed with rounding the norm never saw: book-keeping casts c_i to bf16 and rounds c_i*x to
  bf16; two-pass modes recompute every G in a second backward whose bf16/TF32 rounding differs from the first.

The engine therefore clips with f·sqrt(Σ_layers (ñ_l² + u_l·D_l)), f = (1 + s)·sqrt(k(max u)):

**Norm bound (per layer and sample, data-adaptive, free).** Each operand element x enters the products as
x(1 + δ) with |δ| <= u_x (TF32: ``TF32_TRUNCATION_U`` or ``TF32_ROUNDING_U``; 16-bit operands and IEEE fp32 dots:
0), and tensor-core accumulation loses at most one fp32 ulp per ``ACCUMULATION_BLOCK`` products (β(K), counted as
β/2 per Gram factor). With u the sum over the two operands, the error matrix R = G̃ᵀÃ - GᵀA has a part aligned
with the data, at most u·n (truncation's mean shrink; repeated values), and a row-incoherent part with
E||R_inc||² <= (u²/3)·D, D = Σ_t ||A_t||²·||G_t||² (the diagonal of Σ (AAᵀ)∘(GGᵀ)). Taking ||R_inc|| <= u·√D (√3
over its mean, around which it concentrates) gives n <= (ñ + u√D)/(1 - u), and with 2ab <= a² + b²

    n² <= k(u) · (ñ² + u·D),    k(u) = (1 + u) / (1 - u)²,

linear in ñ² and D, so bounds add over layers and over stacked samples. D/ñ² is about 1 for ordinary rows; a
sample whose rows cancel (D >> ñ²) gets proportionally more margin, as it must. The worst case (every row's
residual aligned, Cauchy-Schwarz) would be u·Σ_t||A_t||·||G_t|| ≈ u·√T·√D: ~1% at T=256. D costs nothing in the
Gram kernel (the diagonals of the two Gram tiles it already holds) and one read of A and G on the direct path.
Where u = 0 (float64, IEEE fp32, exact 16-bit operands on IEEE dots) the bound is the estimate itself.

The engine adds the u·D term per layer and applies k once per step, with the largest u of the step (k grows with
u, so Σ_l k(u_l)·x_l <= k(max u)·Σ_l x_l).

**Coefficient slack s (per step; see ``coefficient_slack``).** Rounding of the contribution itself: 2·u16 + u16²
under 16-bit autocast (book-keeping: c cast to bf16, then c·x rounded to bf16, each <= 2^-8; two-pass: the
second backward recomputes G with independent bf16 rounding, a statistical allowance: its noise measured at most
1.3e-3, std 4.4e-4, on the 16-wide test DiT, so 7.8e-3 is 18 standard deviations there), 2^-10 under TF32 (the
clipped-sum or weight-gradient GEMM rounds its fp32 operands to nearest TF32), 0 in IEEE fp32 and float64.
``DPGradSampleModule.norm_error_margin`` reports f, its parts and the budgets per norm path.

These are worst-case rounding arguments plus two statistical allowances (the incoherent residual, the two-pass
recomputation), not proofs about tensor-core internals nobody documents; ``scripts/gpu_check_clipping.py``
measures every mode x precision on the H200. ``MEMORY_TEST_NORM_MARGINS=0`` switches all of it off (A/B checks).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

MARGINS_ENV = "MEMORY_TEST_NORM_MARGINS"

TF32_TRUNCATION_U = 2.0**-10  # fp32 -> TF32 by dropping 13 mantissa bits: |δ| < 2^-10, always toward zero
TF32_ROUNDING_U = 2.0**-11  # fp32 -> nearest TF32 (FLASH_NORMS_TF32_ROUNDING=1): |δ| <= 2^-11
# cuBLAS does not document its fp32 -> TF32 conversion (measured errors look like rounding): the truncation bound
# covers both.
CUBLAS_TF32_U = TF32_TRUNCATION_U
ACCUMULATION_BLOCK = 8  # products per truncated fp32 ulp: the smallest k of Ampere/Hopper TF32/16-bit MMA shapes
FP32_ULP = 2.0**-23
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TF32_CONTRIBUTION_SLACK = 2.0**-10  # 2 x 2^-11: both operands of the clipped-sum GEMM rounded to nearest TF32


def margins_enabled() -> bool:
    """MEMORY_TEST_NORM_MARGINS=0 turns bounds and slack off (the behaviour before them, for A/B checks only)."""
    value = os.environ.get(MARGINS_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{MARGINS_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def operand_u(dtype: torch.dtype, tf32: bool, tf32_u: float) -> float:
    """Relative perturbation of one operand element: only fp32 values rounded for a TF32 dot are perturbed
    (bf16 and fp16 values are TF32 values; IEEE dots use them as they are)."""
    return tf32_u if tf32 and dtype == torch.float32 else 0.0


def accumulation_u(k: int, tensor_cores: bool) -> float:
    """Relative error bound of a length-k fp32 accumulation on tensor cores (IEEE FMA accumulation: 0)."""
    return math.ceil(k / ACCUMULATION_BLOCK) * FP32_ULP if tensor_cores else 0.0


@dataclass(frozen=True)
class ErrorBudget:
    """The relative budgets of one norm computation: ``u_w`` for the weight norm, ``u_b`` for the bias norm.

    ``key`` names the path and precision (e.g. ``gram fp32 tf32-truncated``) for the margin report.
    """

    key: str
    u_w: float
    u_b: float

    @property
    def exact(self) -> bool:
        return self.u_w == 0.0 and self.u_b == 0.0


@functools.lru_cache(maxsize=256)
def exact_budget(path: str, *dtypes) -> ErrorBudget:
    """No margin: the computation is exact up to IEEE rounding (float64, IEEE fp32 dots, elementwise sums)."""
    return ErrorBudget(_describe(path, dtypes, False, 0.0, False), 0.0, 0.0)


def _describe(path: str, dtypes, tf32: bool, tf32_u: float, tensor_cores: bool) -> str:
    names = "/".join(sorted({str(d).removeprefix("torch.") for d in dtypes}))
    if tf32 and torch.float32 in dtypes:
        how = "tf32-rounded" if tf32_u == TF32_ROUNDING_U else "tf32"
    else:
        how = "tensor-cores" if tensor_cores else "ieee"
    return f"{path} {names} {how}"


@functools.lru_cache(maxsize=1024)  # called once per layer and step: a few µs of Python saved each time
def gram_budget(a_dtype, g_dtype, d: int, p: int, *, tensor_cores_a: bool, tensor_cores_g: bool,
                tf32: bool, tf32_u: float) -> ErrorBudget:  # fmt: skip
    """Σ (AAᵀ)∘(GGᵀ): each Gram reduces over its own features (d for A, p for G) on its own dot."""
    u_a = operand_u(a_dtype, tf32 and tensor_cores_a, tf32_u) + accumulation_u(d, tensor_cores_a) / 2
    u_g = operand_u(g_dtype, tf32 and tensor_cores_g, tf32_u) + accumulation_u(p, tensor_cores_g) / 2
    key = _describe("gram", (a_dtype, g_dtype), tf32, tf32_u, tensor_cores_a or tensor_cores_g)
    return ErrorBudget(key, u_a + u_g + u_a * u_g, u_g)


@functools.lru_cache(maxsize=1024)
def direct_budget(a_dtype, g_dtype, rows: int, *, tensor_cores: bool, tf32: bool, tf32_u: float) -> ErrorBudget:
    """AᵀG reduced over rows on one dot; the bias is a column sum in fp32 on CUDA cores (exact: u_b = 0)."""
    u_a = operand_u(a_dtype, tf32 and tensor_cores, tf32_u)
    u_g = operand_u(g_dtype, tf32 and tensor_cores, tf32_u)
    key = _describe("direct", (a_dtype, g_dtype), tf32, tf32_u, tensor_cores)
    return ErrorBudget(key, u_a + u_g + u_a * u_g + accumulation_u(rows, tensor_cores), 0.0)


def cuda_tf32(device: torch.device) -> bool:
    """Whether torch runs fp32 matmuls on ``device`` in TF32 (CUDA and torch.backends.cuda.matmul.allow_tf32)."""
    return device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32


def torch_budget(path: str, A: torch.Tensor, G: torch.Tensor, dot_dtype: torch.dtype) -> ErrorBudget:
    """Budget of the plain-torch formulas (ghost, and the flash reference) run with ``dot_dtype`` operands:
    bmm through cuBLAS, in TF32 when torch allows it for fp32; 'outer' is elementwise (IEEE)."""
    on_gpu = A.device.type == "cuda"
    return _torch_budget(path, A.dtype, G.dtype, dot_dtype, on_gpu, on_gpu and cuda_tf32(A.device),
                         A.shape[1], A.shape[-1], G.shape[-1])  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _torch_budget(path, a_dtype, g_dtype, dot_dtype, on_gpu: bool, tf32: bool, T: int, d: int, p: int):
    tensor_cores = on_gpu and (dot_dtype in UNIT_ROUNDOFF or (dot_dtype == torch.float32 and tf32))
    if path == "outer" or not tensor_cores:
        return exact_budget(path, a_dtype, g_dtype)
    tf32 = dot_dtype == torch.float32
    if path == "gram":
        return gram_budget(a_dtype, g_dtype, d, p, tensor_cores_a=True, tensor_cores_g=True, tf32=tf32,
                           tf32_u=CUBLAS_TF32_U)  # fmt: skip
    return direct_budget(a_dtype, g_dtype, T, tensor_cores=True, tf32=tf32, tf32_u=CUBLAS_TF32_U)


def coherent_factor(u: float) -> float:
    """k(u) = (1 + u) / (1 - u)²: the bound's factor for the error aligned with the data."""
    return (1.0 + u) / (1.0 - u) ** 2


def incoherent_term(sq: torch.Tensor, u: float, incoherent: torch.Tensor | None) -> torch.Tensor:
    """sq + u·D: the computed squared norm plus the bound's data-dependent term (sq itself when u = 0)."""
    return sq if u == 0.0 else torch.add(sq, incoherent, alpha=u)


def upper_bound(sq: torch.Tensor, u: float, incoherent: torch.Tensor | None) -> torch.Tensor:
    """k(u)·(sq + u·D): an upper bound of the exact squared norm from the computed one (see the module doc).

    The engine adds ``incoherent_term`` per layer (in the kernels, at no cost) and applies the step's largest k
    once, to the clip coefficient: Σ_l k(u_l)·x_l <= k(max u)·Σ_l x_l.
    """
    return sq if u == 0.0 else incoherent_term(sq, u, incoherent) * coherent_factor(u)


def incoherent_sums(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t ||A_t||²·||G_t||², Σ_t ||G_t||²) per sample in fp32, from row norms (no squared copies of A or G)."""
    acc = torch.float64 if torch.float64 in (A.dtype, G.dtype) else torch.float32
    a_sq = torch.linalg.vector_norm(A, dim=-1, dtype=acc).square_()
    g_sq = torch.linalg.vector_norm(G, dim=-1, dtype=acc).square_()
    return (a_sq * g_sq).sum(dim=-1), g_sq.sum(dim=-1)


def coefficient_slack(*, two_pass: bool, dtypes: set, tf32: bool, loss_dtype: torch.dtype) -> tuple[float, str]:
    """(s, why): clip with (1 + s)·n for rounding that happens after the norms (see the module doc).

    ``dtypes``: operand dtypes the norms saw this step (16-bit: autocast); ``tf32``: fp32 operands met TF32 GEMMs.
    """
    s, why = 0.0, []
    for dtype, u in UNIT_ROUNDOFF.items():
        if dtype in dtypes:
            s = max(s, 2 * u + u * u)
            why.append(f"{str(dtype).removeprefix('torch.')} operands: 2u+u² (u={u:g})")
    if tf32:
        s = max(s, TF32_CONTRIBUTION_SLACK)
        why.append(f"tf32 GEMMs: {TF32_CONTRIBUTION_SLACK:g}")
    if two_pass and loss_dtype in UNIT_ROUNDOFF:  # c is cast to the per-sample loss' dtype
        s += UNIT_ROUNDOFF[loss_dtype]
        why.append(f"{str(loss_dtype).removeprefix('torch.')} loss: +u")
    return s, "; ".join(why) or "exact up to IEEE rounding"
