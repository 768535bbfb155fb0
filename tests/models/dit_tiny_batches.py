"""DiT-tiny wrappers and batches shared by the wrapper tests (eager and compiled)."""

from __future__ import annotations

import torch

from memory_test.models.dit_huggingface_wrapper import DiTHuggingFaceWrapper

NUM_CLASSES = 10
SIDE = 8  # latent side of DiT-tiny (img_size 64)


def tiny(**kw) -> DiTHuggingFaceWrapper:
    torch.manual_seed(0)
    return DiTHuggingFaceWrapper("DiT-tiny", num_classes=NUM_CLASSES, **kw)


def batch(n: int = 4, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, SIDE, SIDE, generator=gen, dtype=dtype)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    eps = torch.randn(n, 4, SIDE, SIDE, generator=gen, dtype=dtype)
    return x, t, y, eps
