"""What the optimizer must know about the backward passes since its last step before it may add noise and step."""

from __future__ import annotations

import torch

from .errors import NonFiniteSampleError, PrivacyConfigError


class StepHealth:
    """Non-finite per-sample norms (kept on the device, read once per step) and failed backward passes.

    A sample whose gradient is NaN or infinite would make the whole update NaN; a backward that raised may have left
    part of a batch's gradient behind. Either way the step is refused before noise is drawn or accounted.
    """

    def __init__(self):
        self._nonfinite: list[torch.Tensor] = []  # one bool mask (n,) per backward pass since the last step
        self._failure: str | None = None

    def note_norms(self, norms: torch.Tensor) -> None:
        self._nonfinite.append(~torch.isfinite(norms))  # no host sync here: read at the step

    def note_failure(self, error: BaseException) -> None:
        self._failure = f"{type(error).__name__}: {error}"

    def clear(self) -> None:
        self._nonfinite, self._failure = [], None

    def check(self) -> None:
        """Raise if the coming step must not be taken; the one host sync of the check happens here."""
        failure, masks = self._failure, self._nonfinite
        if failure is not None:
            raise PrivacyConfigError(
                f"refusing the optimizer step: a backward pass since the last step failed ({failure}). Call "
                "optimizer.zero_grad() and run the batch again once the cause is fixed."
            )
        if not masks or not bool(torch.cat(masks).any()):
            self._nonfinite = []
            return
        where = [f"backward {i + 1}: rows {m.nonzero().flatten().tolist()}" for i, m in enumerate(masks) if m.any()]
        raise NonFiniteSampleError(
            "refusing the optimizer step: some samples' gradients are NaN or infinite ("
            + "; ".join(where)
            + "), which would make the whole update NaN. Nothing was noised, accounted or applied; check those "
            "inputs (or lower the learning rate), call optimizer.zero_grad() and continue."
        )
