"""What one forward leaves for the DP backward: shared layer inputs, input groups, and honest byte accounting."""

from __future__ import annotations

import weakref
from collections import Counter

import torch


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class InputGroup:
    """Layers fed the very same input tensor (q, k, v): their norms can share one A-Gram."""

    def __init__(self, x: torch.Tensor):
        self.source = weakref.ref(x)
        self.members: list = []
        self.ready: list = []


class StepCache:
    """Per-step caches of a DPGradSampleModule; everything here is dropped by ``reset()`` at the end of a step."""

    def __init__(self):
        self._casts: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self._groups: dict[int, InputGroup] = {}
        self._storage_refs: Counter = Counter()
        self.bytes = 0
        self.peak_bytes = 0

    def cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x.to(dtype)``, computed once per source tensor per step so that q, k and v share one copy."""
        hit = self._casts.get(id(x))
        if hit is not None and hit[0]() is x:  # the weakref guards against a recycled id()
            return hit[1]
        y = x.to(dtype)
        self._casts[id(x)] = (weakref.ref(x), y)
        return y

    def group_for(self, x: torch.Tensor, state) -> InputGroup:
        """The group of layers whose (detached) input is ``x``; joined by ``state``."""
        key = id(x)
        group = self._groups.get(key)
        if group is None or group.source() is not x:
            group = self._groups[key] = InputGroup(x)
        group.members.append(state)
        return group

    def hold(self, tensors) -> None:
        """Count the storage of tensors the engine now references (each storage once, however many views)."""
        for t in tensors:
            key = _storage_key(t)
            if self._storage_refs[key] == 0:
                self.bytes += t.untyped_storage().nbytes()
            self._storage_refs[key] += 1
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def drop(self, tensors) -> None:
        for t in tensors:
            key = _storage_key(t)
            self._storage_refs[key] -= 1
            if self._storage_refs[key] == 0:
                del self._storage_refs[key]
                self.bytes -= t.untyped_storage().nbytes()

    def reset(self) -> None:
        self._casts.clear()
        self._groups.clear()
