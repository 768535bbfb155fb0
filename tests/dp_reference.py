"""Shared by the exactness tests: a per-sample criterion, the clipped reference update, relative error."""

from __future__ import annotations

import torch

from memory_test.privacy.reference import clipped_sum, per_sample_gradients, per_sample_norms


def per_sample_criterion(k: int, reduction: str):
    """MSE per row, averaged over each sample's k rows (noise multiplicity): shape (n,)."""

    def criterion(pred, target):
        return (pred - target).pow(2).flatten(1).mean(1).view(-1, k).mean(1)

    criterion.reduction = reduction
    return criterion


def reference_update(model, batch, n: int, k: int, max_grad_norm: float, reduction: str):
    """(clipped update, per-sample norms) from one-sample-at-a-time gradients; the update divided by n for 'mean'."""
    x, t, y, target = batch
    crit = per_sample_criterion(k, reduction)

    def loss_of_sample(i):
        rows = slice(i * k, (i + 1) * k)
        return crit(model(x[rows], t[rows], y[rows]), target[rows])[0]

    grads = per_sample_gradients(model, loss_of_sample, n)
    update = clipped_sum(grads, max_grad_norm)
    if reduction == "mean":
        update = [u / n for u in update]
    return update, per_sample_norms(grads)


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| over all parameters together."""
    num = torch.sqrt(sum((g - w).pow(2).sum() for g, w in zip(got, want)))
    return (num / torch.sqrt(sum(w.pow(2).sum() for w in want))).item()
