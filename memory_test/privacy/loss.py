"""The criterion wrapper: per-sample losses in, a loss object whose ``.backward()`` does the mode's DP work."""

from __future__ import annotations

import operator

import torch

from .errors import CriterionError
from .modes import BOOKKEEPING, TWO_PASS

_SCALAR_HELP = (
    "Return per-sample losses of shape (B,): reduce over every dimension except the batch, e.g. "
    "`F.mse_loss(pred, target, reduction='none').flatten(1).mean(1)`, and set `criterion.reduction = 'mean'`."
)


def criterion_reduction(criterion, loss_reduction: str) -> str:
    """The criterion's ``reduction`` ('mean' or 'sum'), checked against make_private's ``loss_reduction``."""
    reduction = getattr(criterion, "reduction", None)
    if reduction is None:
        raise CriterionError(
            "the criterion has no `reduction` attribute, so the engine cannot tell whether the batch loss is a "
            "mean or a sum of per-sample losses. Set `criterion.reduction = 'mean'` (or 'sum'). " + _SCALAR_HELP
        )
    if reduction not in ("mean", "sum"):
        raise CriterionError(f"criterion.reduction must be 'mean' or 'sum', got {reduction!r}. " + _SCALAR_HELP)
    if reduction != loss_reduction:
        raise CriterionError(
            f"criterion.reduction={reduction!r} but make_private(loss_reduction={loss_reduction!r}): make them agree"
        )
    return reduction


def two_pass_backward(gsm, loss_per_sample: torch.Tensor) -> None:
    """Ghost clipping: a norm-recording backward, then a backward of sum_i c_i * loss_i for the clipped sum."""
    coef = gsm.record_norms(loss_per_sample, retain_graph=True)
    if loss_per_sample.numel():
        gsm._in_backward = True
        try:
            (coef.detach().to(loss_per_sample.dtype) * loss_per_sample).sum().backward()
        finally:
            gsm._in_backward = False
    gsm.end_step()


def bookkeeping_backward(gsm, loss_per_sample: torch.Tensor) -> None:
    """Book-keeping: one backward records norms and keeps (A, G); clipped gradients are then written directly."""
    coef = gsm.record_norms(loss_per_sample, retain_graph=False)
    gsm.write_clipped_grads(coef)
    gsm.end_step()


def _guarded(backward):
    """A DP backward that raised leaves no caches behind and makes the optimizer refuse the step."""

    def run(gsm, loss_per_sample: torch.Tensor) -> None:
        try:
            backward(gsm, loss_per_sample)
        except BaseException as exc:
            gsm.abandon_step(exc)
            raise

    run.__doc__ = backward.__doc__
    return run


def upstream_hooks_backward(gsm, loss_per_sample: torch.Tensor) -> None:
    """Upstream Opacus 'hooks': per-sample gradients of the reduced loss; the optimizer clips them."""
    reduce = torch.mean if gsm.loss_reduction == "mean" else torch.sum
    reduce(loss_per_sample).backward()
    for p in gsm.parameters():
        gs = getattr(p, "grad_sample", None)
        if isinstance(gs, torch.Tensor) and gs.shape[0] != loss_per_sample.shape[0]:
            raise CriterionError(
                f"grad_sample_mode='hooks' treats every row as a sample, but the model saw {gs.shape[0]} rows for "
                f"{loss_per_sample.shape[0]} losses (noise multiplicity K > 1?). Use one of this package's modes."
            )
        break


BACKWARDS = {
    TWO_PASS: _guarded(two_pass_backward),
    BOOKKEEPING: _guarded(bookkeeping_backward),
    "upstream_hooks": upstream_hooks_backward,
}


class DPLoss:
    """Wraps a per-sample criterion; calling it returns a :class:`DPLossTensor`."""

    def __init__(self, criterion, *, module, strategy: str, loss_reduction: str):
        self.criterion = criterion
        self.module = module
        self.backward_fn = BACKWARDS[strategy]
        self.reduction = criterion_reduction(criterion, loss_reduction)

    def __call__(self, *args, **kwargs) -> DPLossTensor:
        # torch losses (e.g. nn.CrossEntropyLoss) return per-sample values when asked for reduction='none'.
        self.criterion.reduction = "none"
        try:
            loss = self.criterion(*args, **kwargs)
        finally:
            self.criterion.reduction = self.reduction
        if not isinstance(loss, torch.Tensor) or loss.dim() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise CriterionError(f"the criterion returned {shape}, not per-sample losses of shape (B,). {_SCALAR_HELP}")
        return DPLossTensor(loss, self)


class DPLossTensor:
    """Per-sample losses; ``backward()`` runs the mode's clipping, reading as the reduced loss otherwise."""

    def __init__(self, loss_per_sample: torch.Tensor, owner: DPLoss):
        self.loss_per_sample = loss_per_sample
        self._owner = owner

    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None) -> None:
        """The DP backward (norms, clipping; the engine decides what to retain). torch.Tensor.backward's arguments
        would change what is differentiated or kept, which the clipping cannot follow: refused."""
        given = {"gradient": gradient, "retain_graph": retain_graph, "create_graph": create_graph, "inputs": inputs}
        used = [name for name, value in given.items() if value not in (None, False)]
        if used:
            raise CriterionError(
                f"the DP loss's backward() takes no arguments (got {', '.join(used)}): the engine runs its own "
                "backward(s) to clip each sample; call loss.backward() once per step, and compute any other "
                "gradient from a separate forward."
            )
        self._owner.backward_fn(self._owner.module, self.loss_per_sample)

    def detach(self) -> torch.Tensor:
        reduce = torch.mean if self._owner.reduction == "mean" else torch.sum
        return reduce(self.loss_per_sample.detach())

    def item(self) -> float:
        return self.detach().item()

    def mean(self) -> torch.Tensor:
        return self.loss_per_sample.detach().mean()

    def __float__(self) -> float:
        return self.item()

    @property
    def shape(self) -> torch.Size:
        return self.loss_per_sample.shape

    def __repr__(self) -> str:
        return f"DPLossTensor(reduction={self._owner.reduction!r}, per_sample_shape={tuple(self.shape)})"

    def _combine(self, other, op):
        other = other.loss_per_sample if isinstance(other, DPLossTensor) else other
        return DPLossTensor(op(self.loss_per_sample, other), self._owner)

    def __add__(self, other):
        return self._combine(other, operator.add)

    def __sub__(self, other):
        return self._combine(other, operator.sub)

    def __mul__(self, other):
        return self._combine(other, operator.mul)

    def __truediv__(self, other):
        return self._combine(other, operator.truediv)

    __radd__ = __add__
    __rmul__ = __mul__
