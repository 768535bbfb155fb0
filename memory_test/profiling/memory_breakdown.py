"""Where the peak went: weights, gradients, optimizer state, any parts the caller measured, and the remainder.

The base parts are byte counts of live tensors taken after the last measured step (before ``zero_grad``); a caller
adds its own parts (a trainer's extra state, from its own counters) and says which of them share storage with the
remainder (``overlapping``). ``activations_and_other`` is derived as ``peak - sum(parts)``: activations saved for
backward, temporaries, workspace and anything else; with gradients released during the step
(``zero_grad(set_to_none=True)``) the gradient part is an upper bound of what was live at the peak, so the
remainder is then a lower bound.
"""

from __future__ import annotations

import torch

BASE_PARTS = ("weights", "gradients", "optimizer_state")
REMAINDER = "activations_and_other"


def _local(t):
    """A DTensor's local shard (FSDP2 parameters, their gradients and optimizer state); other tensors as they are."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        t = _local(t) if isinstance(t, torch.Tensor) else t
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters (trainable and frozen) and buffers."""
    return _unique_bytes(list(model.parameters()) + list(model.buffers()))


def trainable_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of one gradient per trainable parameter (this rank's shard of a sharded parameter)."""
    return sum(_local(p).numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def grad_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameter-shaped ``.grad`` tensors alive now."""
    return _unique_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` (e.g. Adam's two moments and step counters)."""
    tensors = []
    for state in optimizer.state.values():
        tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return _unique_bytes(tensors)


def build_breakdown(peak_bytes: int | None, measured: dict[str, int | None], overlapping: tuple[str, ...] = ()) -> dict:
    """Parts that add up to ``peak_bytes``: ``measured`` (BASE_PARTS first, then the caller's own, in its order;
    None: not available) plus the derived remainder. ``overlapping`` names measured parts whose storage the
    remainder also holds: the remainder is then smaller by their size and may fall below zero."""
    names = [*BASE_PARTS, *(k for k in measured if k not in BASE_PARTS)]
    parts = {k: int(measured.get(k) or 0) for k in names}
    out = {
        "total_bytes": peak_bytes,
        "parts_bytes": dict(parts),
        "measured": [k for k in names if measured.get(k) is not None],
        "derived": [REMAINDER],
        "not_available": [k for k in names if measured.get(k) is None],
        "overlapping": [k for k in overlapping if k in parts],
    }
    if peak_bytes is None:
        out["parts_bytes"][REMAINDER] = None
        out["note"] = "no peak counter on this device: parts are listed without a remainder"
        return out
    rest = int(peak_bytes) - sum(parts.values())
    out["parts_bytes"][REMAINDER] = rest
    if rest < 0:
        out["note"] = (
            "measured parts exceed the peak (parts that overlap the remainder, tensors allocated after the peak "
            "moment, or a sampled peak that missed the spike); the remainder is negative"
        )
    return out
