"""Opacus' fast-gradient-clipping optimizer with the per-parameter Python loops fused (same math, same noise law)."""

from __future__ import annotations

import operator

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
        grads = [p.summed_grad for p in params]
        for g in grads:
            _check_processed_flag(g)
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        if std > 0:
            for lo, hi, numels in self._noise_chunks(params):
                ref = grads[lo]
                flat = torch.empty(sum(numels), device=ref.device, dtype=ref.dtype)
                flat.normal_(0.0, std, generator=self.generator)
                torch._foreach_add_([g.view(-1) for g in grads[lo:hi]], list(flat.split(numels)))
                del flat
        for p, g in zip(params, grads):
            p.grad = g  # summed_grad has p's shape, dtype and device (it was p.grad)
            _mark_as_processed(g)

    def _noise_chunks(self, params: list) -> list:
        """(start, end, numels) of each noise chunk, computed once per parameter list (the .grad setter keeps
        every gradient in its parameter's dtype and device, so parameters decide the chunks)."""
        plan = getattr(self, "_noise_plan", None)
        if plan is None or len(plan[0]) != len(params) or not all(map(operator.is_, plan[0], params)):
            plan = self._noise_plan = (list(params), list(_chunks(params)))
        return plan[1]

    def scale_grad(self):
        if self.loss_reduction == "mean":
            grads = [p.grad for p in self.params]
            torch._foreach_div_(grads, self.expected_batch_size * self.accumulated_iterations)


def _chunks(params):
    """(start, end, numels): consecutive parameters of one device and dtype, up to NOISE_CHUNK_NUMEL elements."""
    lo, numels, size = 0, [], 0
    for i, p in enumerate(params):
        if numels and (
            size + p.numel() > NOISE_CHUNK_NUMEL or p.device != params[lo].device or p.dtype != params[lo].dtype
        ):
            yield lo, i, numels
            lo, numels, size = i, [], 0
        numels.append(p.numel())
        size += p.numel()
    if numels:
        yield lo, len(params), numels
