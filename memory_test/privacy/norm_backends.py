"""Norm algorithms for Linear-like layers: ghost (torch Gram matrices) and flash (fused kernels)."""

from __future__ import annotations

import torch

from .modes import FLASH, GHOST


def accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    """Norms accumulate in fp32 even under bf16/fp16 autocast; float64 stays float64 (exactness tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class GhostNorms:
    """Opacus-style ghost norms: ||A_iᵀG_i||² = <A_iA_iᵀ, G_iG_iᵀ>, two B x T x T Gram matrices in memory."""

    name = GHOST
    accumulate_dtype = staticmethod(accumulate_dtype)

    def kernel_backend(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        return "torch"

    def predict_path(self, rows: int, d: int, p: int, dtype: torch.dtype = torch.float32) -> str:
        return "outer" if rows == 1 else "gram"

    def linear_sq_norms(self, A: torch.Tensor, G: torch.Tensor, *, with_bias: bool):
        dtype = accumulate_dtype(G)
        A, G = A.to(dtype), G.to(dtype)
        if A.shape[1] == 1:  # one row per sample: the gradient is an outer product, the bias gradient G itself
            g_sq = G.square().sum(dim=(1, 2))
            return A.square().sum(dim=(1, 2)) * g_sq, (g_sq if with_bias else None), "outer"
        ggT = torch.bmm(G, G.transpose(1, 2))
        w_sq = (torch.bmm(A, A.transpose(1, 2)) * ggT).sum(dim=(1, 2))
        # ||Σ_t g_t||² is the sum of every entry of G Gᵀ, already in memory.
        return w_sq, (ggT.sum(dim=(1, 2)) if with_bias else None), "gram"

    def multi_linear_sq_norms(self, A, Gs, *, with_bias):
        """One layer at a time, as Opacus does: ghost is the unfused baseline."""
        return [self.linear_sq_norms(A, G, with_bias=b) for G, b in zip(Gs, with_bias)]


class FlashNorms:
    """Fused per-sample norm kernels (memory_test.kernels): Gram or direct path chosen per layer by cost."""

    name = FLASH
    accumulate_dtype = staticmethod(accumulate_dtype)

    def __init__(self):
        from memory_test.kernels import flash_norms  # imported lazily: triton is only needed by flash modes

        self._kernels = flash_norms

    def kernel_backend(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        return self._kernels.kernel_backend(device, dtype)

    def predict_path(self, rows: int, d: int, p: int, dtype: torch.dtype = torch.float32) -> str:
        return self._kernels.choose_path(rows, d, p, dtype)

    def linear_sq_norms(self, A: torch.Tensor, G: torch.Tensor, *, with_bias: bool):
        return self._kernels.linear_sq_norms(A, G, with_bias=with_bias)

    def multi_linear_sq_norms(self, A, Gs, *, with_bias):
        return self._kernels.multi_linear_sq_norms(A, Gs, with_bias=with_bias)


NORM_BACKENDS = {GHOST: GhostNorms, FLASH: FlashNorms}
