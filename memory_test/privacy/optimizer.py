"""Opacus' fast-gradient-clipping optimizer with the per-parameter Python loops fused (same math, same noise law)."""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

# Noise is drawn in flat chunks of at most this many elements: one kernel per chunk instead of one per parameter,
# with a bounded temporary (512 MiB in fp32).
NOISE_CHUNK_NUMEL = 1 << 27


class FusedDPOptimizer(DPOptimizerFastGradientClipping):
    """``p.grad`` holds Σ_i c_i g_i; add N(0, (σC)²) to every parameter, divide by the expected batch, step.

    Differences from the parent are implementation only: the clipped sum is moved (not deep-copied) into
    ``summed_grad``, noise for many parameters is drawn by one ``normal_`` call and added with ``_foreach_add_``,
    and scaling uses ``_foreach_div_``. ``secure_mode`` keeps Opacus' own noise routine, which it needs.
    """

    def accumulate(self):
        for p in self.params:
            if p.summed_grad is None:
                p.summed_grad, p.grad = p.grad, None  # a move: nothing else holds this tensor
            else:
                p.summed_grad.add_(p.grad)

    def add_noise(self):
        if self.secure_mode:
            return super().add_noise()
        params = self.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        if std > 0:
            for chunk in _chunks(params):
                ref = chunk[0].summed_grad
                numels = [p.summed_grad.numel() for p in chunk]
                flat = torch.empty(sum(numels), device=ref.device, dtype=ref.dtype)
                flat.normal_(0.0, std, generator=self.generator)
                torch._foreach_add_([p.summed_grad.view(-1) for p in chunk], list(flat.split(numels)))
                del flat
        for p in params:
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self):
        if self.loss_reduction == "mean":
            grads = [p.grad for p in self.params]
            torch._foreach_div_(grads, self.expected_batch_size * self.accumulated_iterations)


def _chunks(params):
    """Consecutive parameters of one device and dtype, up to NOISE_CHUNK_NUMEL elements per chunk."""
    chunk, size = [], 0
    for p in params:
        g = p.summed_grad
        if chunk and (
            size + g.numel() > NOISE_CHUNK_NUMEL
            or g.device != chunk[0].summed_grad.device
            or g.dtype != chunk[0].summed_grad.dtype
        ):
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += g.numel()
    if chunk:
        yield chunk
