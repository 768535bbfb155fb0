"""What one forward leaves for the DP backward: shared layer inputs, input groups, and honest byte accounting."""

from __future__ import annotations

import weakref

import torch


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
        self._held: dict[int, list[int]] = {}  # storage key -> [references, bytes]
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

    def hold(self, tensors) -> list[int]:
        """Count the storage of tensors the engine now references (each storage once, however many views).

        Returns the storage keys that ``drop`` takes back, so that a release need not look the storages up again.
        """
        held, keys = self._held, []
        for t in tensors:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            entry = held.get(key)
            if entry is None:
                entry = held[key] = [0, storage.nbytes()]
                self.bytes += entry[1]
            entry[0] += 1
            keys.append(key)
        if self.bytes > self.peak_bytes:
            self.peak_bytes = self.bytes
        return keys

    def drop(self, keys) -> None:
        """Release storage keys returned by ``hold``."""
        held = self._held
        for key in keys:
            entry = held[key]
            entry[0] -= 1
            if entry[0] == 0:
                del held[key]
                self.bytes -= entry[1]

    def reset(self) -> None:
        self._casts.clear()
        self._groups.clear()
