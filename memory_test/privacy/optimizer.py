"""Opacus' fast-gradient-clipping optimizer with the per-parameter Python loops fused (same math, same noise law)."""

from __future__ import annotations

import operator

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping, FSDPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from .validation import check_noise_std

# Noise is drawn in flat chunks of at most this many elements: one kernel per chunk instead of one per parameter,
# with a bounded temporary (512 MiB in fp32).
NOISE_CHUNK_NUMEL = 1 << 27


class StepGuards:
    """What every optimizer of this package's modes checks before it noises, accounts and steps.

    - the noise std is a finite number >= 0 (sigma and C are validated at make_private; this catches later edits);
    - the backward passes since the last step were complete and every sample's gradient was finite
      (``health``, the wrapped model's StepHealth);
    - ``zero_grad()`` without ``set_to_none`` gives fresh gradients: Opacus marks the tensors it used with
      ``_processed``, and zeroing in place keeps the mark on the same tensor, so the next step would refuse it;
    - gradient accumulation (several DP backward passes, then one step) divides by B times the number of passes
      and is accounted at that many times the sample rate, as Opacus' ``hooks`` mode does. Upstream
      fast-gradient clipping counts 1: an update twice too large and an epsilon computed for half the sampling.
    """

    health = None  # set by PrivacyEngine.make_private

    @property
    def accumulated_iterations(self) -> int:
        """DP backward passes since the previous ``step()`` call (skipped BatchMemoryManager steps included)."""
        return max(1, self.health.backwards_in_step) if self.health is not None else 1

    def pre_step(self, closure=None):
        if self.health is not None:
            self.health.step_called()
        try:
            return super().pre_step(closure)
        except BaseException:
            # A refused step drops the whole logical batch (accumulated physical batches too) at the next zero_grad.
            self._is_last_step_skipped = False
            raise

    def _guard_step(self) -> None:
        check_noise_std(self._noise_std())
        if self.health is not None:
            self.health.check()

    def _noise_std(self) -> float:
        return float(getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm)

    def zero_grad(self, set_to_none: bool = False):
        super().zero_grad(set_to_none)
        for p in self.params:
            if p.grad is not None and hasattr(p.grad, "_processed"):
                del p.grad._processed  # zeroed in place: a fresh gradient now
        if self.health is not None:  # after a skipped step the accumulated gradient, and what it holds, stays
            self.health.clear(keep_accumulated=self._is_last_step_skipped)


class GuardedFSDPOptimizer(StepGuards, FSDPOptimizerFastGradientClipping):
    """Opacus' FSDP fast-gradient-clipping optimizer with this package's step guards."""

    def add_noise(self):
        self._guard_step()
        super().add_noise()


class FusedDPOptimizer(StepGuards, DPOptimizerFastGradientClipping):
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
        self._guard_step()
        if self.secure_mode:
            return super().add_noise()
        params = self.params
        grads = [p.summed_grad for p in params]
        for g in grads:
            _check_processed_flag(g)
        std = self._noise_std()
        if std > 0:  # std == 0 only for an explicit noise_multiplier=0 run, whose epsilon is reported as inf
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
