"""The obviously-correct slow reference: per-sample gradients one sample at a time, clipped, summed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def per_sample_gradients(
    model: nn.Module, loss_of_sample: Callable[[int], torch.Tensor], n: int
) -> list[list[torch.Tensor]]:
    """Gradients of ``loss_of_sample(i)`` (a scalar computed on sample i alone) for each trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(n):
        loss = loss_of_sample(i)
        grads.append(
            [
                g if g is not None else torch.zeros_like(p)
                for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)
            ]
        )
    return grads


def clipped_sum(grads: Sequence[Sequence[torch.Tensor]], max_grad_norm: float) -> list[torch.Tensor]:
    """Sum over samples of each gradient clipped to ``max_grad_norm`` (Opacus' coefficient C / (norm + 1e-6))."""
    total = [torch.zeros_like(g) for g in grads[0]]
    for sample in grads:
        norm = torch.sqrt(sum(g.pow(2).sum() for g in sample))
        coef = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for acc, g in zip(total, sample):
            acc += coef * g
    return total


def per_sample_norms(grads: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Per-sample L2 norms over all parameters (for choosing a clipping bound in tests; never log them)."""
    return torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in sample)) for sample in grads])
