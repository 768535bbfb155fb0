"""What the tests share: the tiny stock DiT, the float64 one-sample-at-a-time reference update, the engine set-up
of the exactness tests, and a tiny latent file (test files never import each other).

Test folders mirror the packages of memory_test (privacy/, kernels/, models/, diffusion/, train/, records/,
profiling/, suite/, plots/, cli_common/); tests/test_layout.py checks the import graph of the whole package.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memory_test.privacy import PrivacyEngine
from memory_test.privacy.reference import clipped_sum, per_sample_gradients, per_sample_norms

REPO = Path(__file__).resolve().parents[1]
FIXTURE_RECORDS = REPO / "tests" / "fixtures" / "records"

# ----- the tiny DiT -------------------------------------------------------------------------------------------


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


# ----- the float64 reference ----------------------------------------------------------------------------------


def per_sample_criterion(k: int, reduction: str):
    """MSE per row, averaged over each sample's k rows (noise multiplicity): shape (n,)."""

    def criterion(pred, target):
        return (pred - target).pow(2).flatten(1).mean(1).view(-1, k).mean(1)

    criterion.reduction = reduction
    return criterion


def reference_update(model, batch, n: int, k: int, max_grad_norm: float, reduction: str):
    """(clipped update, per-sample norms) from one-sample-at-a-time gradients; the update divided by n for 'mean'."""
    x, t, y, target = batch
    crit = per_sample_criterion(k, reduction)

    def loss_of_sample(i):
        rows = slice(i * k, (i + 1) * k)
        return crit(model(x[rows], t[rows], y[rows]), target[rows])[0]

    grads = per_sample_gradients(model, loss_of_sample, n)
    update = clipped_sum(grads, max_grad_norm)
    if reduction == "mean":
        update = [u / n for u in update]
    return update, per_sample_norms(grads)


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| over all parameters together."""
    num = torch.sqrt(sum((g - w).pow(2).sum() for g, w in zip(got, want)))
    return (num / torch.sqrt(sum(w.pow(2).sum() for w in want))).item()


# ----- the engine, as the exactness tests set it up ---------------------------------------------------------


def make_private(model, mode="bookkeeping", criterion=per_sample_mse, n=4, **kwargs):
    """make_private on a one-batch loader of n samples (noise 0 unless given, no Poisson sampling)."""
    kwargs = {"noise_multiplier": 0.0, "max_grad_norm": 1.0, "poisson_sampling": False, **kwargs}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(torch.zeros(n)), batch_size=n)
    return PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, criterion=criterion, grad_sample_mode=mode, **kwargs
    )


def dp_update(model, batch, k, max_grad_norm, mode, reduction, n=4):
    """The parameter update of one noiseless DP-SGD step (SGD, lr 1) of a copy of ``model`` on ``batch``."""
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    dp_model, dp_opt, crit, _ = make_private(
        model, mode, per_sample_criterion(k, reduction), n, max_grad_norm=max_grad_norm, loss_reduction=reduction
    )
    x, t, y, target = batch
    loss = crit(dp_model(x, t, y), target)
    loss.backward()
    dp_opt.step()
    return [b - p.detach() for b, p in zip(before, model.parameters())]


# ----- files --------------------------------------------------------------------------------------------------


def tiny_latents(path: Path, n: int = 64) -> Path:
    """A latent file as latent_dataset writes it (4x8x8, 4 classes) without running a VAE."""
    from memory_test.diffusion import latent_dataset as ld

    meta = {"format": ld.FORMAT, "fingerprint": "f", "classes": json.dumps(list("abcd")), "image_size": "64"}
    tensors = {"latents": torch.randn(n, 4, 8, 8), "labels": torch.arange(n) % 4}
    save_file(tensors, str(path), meta)
    return path


def record_json(path) -> dict:
    """The JSON object of a record file, after checking that it loads as a valid record of the schema."""
    from memory_test.records.io import load_record

    rec, why = load_record(path)
    assert rec is not None, why
    return json.loads(Path(path).read_text())
