"""What the optimizer must know about the backward passes since its last step before it may add noise and step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import CoverageError, NonFiniteSampleError, PrivacyConfigError


@dataclass
class _Since:
    """What happened to a set of gradients: per DP backward a non-finite mask, a failed backward, a foreign one."""

    masks: list = field(default_factory=list)  # one bool mask (n,) per DP backward pass, kept on the device
    failure: str | None = None
    foreign: str | None = None  # a parameter that got gradient from a backward outside the DP criterion

    def absorb(self, other: _Since) -> None:
        self.masks += other.masks
        self.failure = self.failure or other.failure
        self.foreign = self.foreign or other.foreign


class StepHealth:
    """Non-finite per-sample norms, failed backward passes and gradients written outside the DP criterion.

    A sample whose gradient is NaN or infinite would make the whole update NaN; a backward that raised may have left
    part of a batch's gradient behind; a plain ``loss.backward()`` (a loss not made by the DP criterion) leaves an
    unclipped gradient. Any of them refuses the step before noise is drawn or accounted.

    Two sets are kept: ``current`` (the gradients in ``p.grad``, since the last ``optimizer.step()`` call) and
    ``pending`` (what skipped steps — BatchMemoryManager's physical batches — moved into the accumulated gradient).
    ``zero_grad`` always drops ``current`` and drops ``pending`` only when the accumulated gradient is dropped too.
    """

    def __init__(self):
        self.current, self.pending = _Since(), _Since()
        self.backwards_in_step = 0  # DP backward passes between the last two optimizer.step() calls

    def note_norms(self, norms: torch.Tensor) -> None:
        self.current.masks.append(~torch.isfinite(norms))  # no host sync here: read at the step

    def note_failure(self, error: BaseException) -> None:
        self.current.failure = f"{type(error).__name__}: {error}"

    def note_foreign_gradient(self, name: str) -> None:
        self.current.foreign = self.current.foreign or name

    def step_called(self) -> None:
        """optimizer.step() began: its gradients join the accumulated ones (skipped step or not)."""
        self.backwards_in_step = len(self.current.masks)
        self.pending.absorb(self.current)
        self.current = _Since()

    def clear(self, *, keep_accumulated: bool = False) -> None:
        self.current = _Since()
        if not keep_accumulated:
            self.pending = _Since()

    def check(self) -> None:
        """Raise if the coming step must not be taken; the one host sync of the check happens here."""
        seen = _Since()
        seen.absorb(self.pending)
        seen.absorb(self.current)
        if seen.failure is not None:
            raise PrivacyConfigError(
                f"refusing the optimizer step: a backward pass since the last step failed ({seen.failure}). Call "
                "optimizer.zero_grad() and run the batch again once the cause is fixed."
            )
        if seen.foreign is not None:
            raise CoverageError(
                f"refusing the optimizer step: {seen.foreign} got a gradient from a backward outside the DP "
                "criterion (e.g. loss.backward() on a loss not computed by the criterion make_private returned), "
                "which is not clipped per sample. Nothing was noised, accounted or applied: call "
                "optimizer.zero_grad() and compute the loss with the criterion make_private returned."
            )
        masks = seen.masks
        if not masks or not bool(torch.cat(masks).any()):
            self.clear()
            return
        where = [f"backward {i + 1}: rows {m.nonzero().flatten().tolist()}" for i, m in enumerate(masks) if m.any()]
        raise NonFiniteSampleError(
            "refusing the optimizer step: some samples' gradients are NaN or infinite ("
            + "; ".join(where)
            + "), which would make the whole update NaN. Nothing was noised, accounted or applied; check those "
            "inputs (or lower the learning rate), call optimizer.zero_grad() and continue."
        )
