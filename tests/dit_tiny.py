"""A tiny stock diffusers DiT for engine tests: random non-zero weights, deterministic forward."""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel
from torch import nn


class TinyDiT(nn.Module):
    """Stock DiTTransformer2DModel (block 0's embedder runs twice per forward); returns the 4 epsilon channels."""

    def __init__(self, num_layers: int = 2, sample_size: int = 4, num_classes: int = 5, seed: int = 0):
        super().__init__()
        self.model = DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=4,
            in_channels=4,
            out_channels=8,
            num_layers=num_layers,
            sample_size=sample_size,
            patch_size=2,
            num_embeds_ada_norm=num_classes,
            norm_num_groups=2,
        )
        for blk in self.model.transformer_blocks:  # label dropout draws random numbers: off for exactness tests
            blk.norm1.emb.class_embedder.dropout_prob = 0.0
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # adaLN-Zero style zero inits would hide whole paths from the test
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x, t, y):
        return self.model(x, timestep=t, class_labels=y).sample[:, :4]


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample epsilon MSE, shape (B,)."""
    return (pred - target).pow(2).flatten(1).mean(1)


per_sample_mse.reduction = "mean"


def make_batch(n: int, k: int = 1, sample_size: int = 4, num_classes: int = 5, seed: int = 1, dtype=torch.float64):
    """n samples, each repeated k times (noise multiplicity) in sample-major order with its own t and target."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, sample_size, sample_size, generator=gen, dtype=dtype)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    rows = n * k
    t = torch.randint(0, 1000, (rows,), generator=gen)
    target = torch.randn(rows, 4, sample_size, sample_size, generator=gen, dtype=dtype)
    return x0.repeat_interleave(k, 0), t, y.repeat_interleave(k, 0), target
