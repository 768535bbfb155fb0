"""The criterion wrapper: per-sample losses in, a loss object whose ``.backward()`` does the mode's DP work."""

from __future__ import annotations

import operator

import torch

from .errors import SPENT_FORWARD, CriterionError
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


# torch's RuntimeError when a backward reaches nodes whose saved tensors an earlier backward freed.
_TORCH_SECOND_BACKWARD = "backward through the graph a second time"
_SPENT_LOSS = (
    "backward() ran a second time on one DP loss: the first already added its samples' gradients and freed its "
    "graph. Call loss.backward() once per loss (for gradient accumulation: one forward and one DP loss per batch)."
)
_STEP_REFUSED = " The next optimizer.step() is refused: call optimizer.zero_grad() and run the batch again."


def _engine_error(exc: BaseException) -> BaseException:
    """The engine's own error for torch's second-backward RuntimeError; any other exception as it is."""
    if isinstance(exc, RuntimeError) and _TORCH_SECOND_BACKWARD in str(exc):
        return CriterionError(SPENT_FORWARD)
    return exc


def _guarded(backward):
    """A DP backward that raised leaves no caches behind and makes the optimizer refuse the step."""

    def run(gsm, loss_per_sample: torch.Tensor) -> None:
        try:
            backward(gsm, loss_per_sample)
        except BaseException as exc:
            error = _engine_error(exc)
            gsm.abandon_step(error)
            if error is exc:
                raise
            raise error from exc

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


class _Spent:
    """Shared by a DP loss and every loss combined from it: whether a backward has run through them."""

    done = False


class DPLossTensor:
    """Per-sample losses; ``backward()`` runs the mode's clipping, reading as the reduced loss otherwise."""

    def __init__(self, loss_per_sample: torch.Tensor, owner: DPLoss, spent: tuple[_Spent, ...] | None = None):
        self.loss_per_sample = loss_per_sample
        self._owner = owner
        self._spent = spent if spent is not None else (_Spent(),)

    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None) -> None:
        """The DP backward (norms, clipping; the engine decides what to retain), once per loss. torch.Tensor.backward's
        arguments would change what is differentiated or kept, which the clipping cannot follow: refused."""
        given = {"gradient": gradient, "retain_graph": retain_graph, "create_graph": create_graph, "inputs": inputs}
        used = [name for name, value in given.items() if value not in (None, False)]
        if used:
            raise CriterionError(
                f"the DP loss's backward() takes no arguments (got {', '.join(used)}): the engine runs its own "
                "backward(s) to clip each sample; call loss.backward() once per step, and compute any other "
                "gradient from a separate forward."
            )
        module = self._owner.module
        if any(s.done for s in self._spent):
            self._refuse_second_backward(getattr(module, "step_health", None))
        self._owner.backward_fn(module, self.loss_per_sample)
        for s in self._spent:  # only a backward that ran through: one that raised is reported by its own error
            s.done = True

    @staticmethod
    def _refuse_second_backward(health) -> None:
        """Nothing runs; this package's modes also refuse the coming step (upstream hooks keep the first update)."""
        if health is None:
            raise CriterionError(_SPENT_LOSS)
        error = CriterionError(_SPENT_LOSS + _STEP_REFUSED)
        health.note_failure(error)
        raise error

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
        spent = self._spent + (other._spent if isinstance(other, DPLossTensor) else ())
        other = other.loss_per_sample if isinstance(other, DPLossTensor) else other
        return DPLossTensor(op(self.loss_per_sample, other), self._owner, spent)

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
