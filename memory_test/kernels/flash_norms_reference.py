"""Plain-torch per-sample Linear gradient norms: the reference for tests and benchmarks, and Opacus' einsum baseline."""

from __future__ import annotations

import torch

# Temporaries (per-sample Grams or weight gradients, and the upcast inputs) are bounded by processing samples in chunks.
_CHUNK_BYTES = 1 << 30


def accumulate_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any operand is float64 (exactness tests), else float32 (fp32 accumulation for fp32/bf16/fp16)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, d) -> (B, 1, d); (B, T, d) unchanged."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise ValueError(f"expected a (B, d) or (B, T, d) tensor, got shape {tuple(x.shape)}")
    return x


def check_pair(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows views of A and G after checking that batch and row counts agree."""
    A, G = as_rows(A), as_rows(G)
    if A.shape[:2] != G.shape[:2]:
        raise ValueError(f"A {tuple(A.shape)} and G {tuple(G.shape)} disagree on (batch, rows)")
    if A.device != G.device:
        raise ValueError(f"A on {A.device} and G on {G.device}")
    return A, G


def _chunk(B: int, per_sample_bytes: int) -> int:
    return max(1, min(B, _CHUNK_BYTES // max(1, per_sample_bytes)))


def linear_sq_norms_reference(
    A: torch.Tensor, G: torch.Tensor, *, with_bias: bool, path: str = "gram", dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(||A_iᵀG_i||², ||Σ_t G_i,t||² or None) per sample via the Gram, direct or outer formula, in `dtype`."""
    A, G = check_pair(A, G)
    dtype = dtype or accumulate_dtype(A, G)
    B, T, d = A.shape
    p = G.shape[-1]
    size = torch.finfo(dtype).bits // 8
    if path == "gram":
        per_sample = (2 * T * T + T * (d + p)) * size
    elif path == "direct":
        per_sample = (d * p + T * (d + p)) * size
    elif path == "outer":
        if T != 1:
            raise ValueError(f"the outer path needs one row per sample, got {T}")
        per_sample = (d + p) * size
    else:
        raise ValueError(f"unknown path {path!r}; expected 'gram', 'direct' or 'outer'")
    step = _chunk(B, per_sample)
    if step >= B:  # one chunk (always for the outer path): no preallocated outputs, no slice writes
        return _sq_norms(A.to(dtype), G.to(dtype), path, with_bias)
    w = torch.empty(B, dtype=dtype, device=A.device)
    b = torch.empty(B, dtype=dtype, device=A.device) if with_bias else None
    for lo in range(0, B, step):
        w[lo : lo + step], b_part = _sq_norms(A[lo : lo + step].to(dtype), G[lo : lo + step].to(dtype), path, with_bias)
        if with_bias:
            b[lo : lo + step] = b_part
    return w, b


def _sq_norms(a: torch.Tensor, g: torch.Tensor, path: str, with_bias: bool):
    """The weight (and bias) squared norms of one chunk of samples, by the formula of ``path``."""
    if path == "gram":
        w = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))
    elif path == "direct":
        w = torch.bmm(a.transpose(1, 2), g).square().sum(dim=(1, 2))
    else:  # outer: one row per sample, so the bias gradient is that row of g
        g_sq = g.square().sum(dim=(1, 2))
        return a.square().sum(dim=(1, 2)) * g_sq, (g_sq if with_bias else None)
    return w, (g.sum(dim=1).square().sum(dim=1) if with_bias else None)


def per_sample_gradient_sq_norms(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit per-sample gradients G_iᵀA_i and Σ_t G_i,t in float64, then their squared norms (tests only)."""
    A, G = check_pair(A, G)
    A, G = A.double(), G.double()
    weight_grads = torch.stack([G[i].t() @ A[i] for i in range(A.shape[0])])
    return weight_grads.square().sum(dim=(1, 2)), G.sum(dim=1).square().sum(dim=1)


def opacus_einsum_sq_norms(
    A: torch.Tensor, G: torch.Tensor, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Opacus 1.6 `compute_linear_norm_sample`, squared: einsum Grams in the input dtype, bias Gram recomputed."""
    activations, backprops = A.to(G.dtype), G
    w = b = None
    if backprops.dim() == 2:
        g = torch.einsum("n...i,n...i->n", backprops, backprops)
        a = torch.einsum("n...j,n...j->n", activations, activations)
        w = (g * a).flatten()
        if with_bias:
            b = torch.einsum("n...i,n...i->n", backprops, backprops).flatten()
    else:
        ggT = torch.einsum("nik,njk->nij", backprops, backprops)
        aaT = torch.einsum("nik,njk->nij", activations, activations)
        w = torch.einsum("n...i,n...i->n", ggT, aaT).clamp(min=0)
        del ggT, aaT
        if with_bias:
            # Opacus builds the B x T x T output Gram a second time for the bias norm.
            ggT = torch.einsum("nik,njk->nij", backprops, backprops)
            b = torch.einsum("n...i->n", ggT).clamp(min=0)
    # Opacus returns the square roots; squaring them back would only add rounding, so the squares are kept.
    return w, b
