"""The latent file a run trains on, and the DiT that fits it."""

from __future__ import annotations

import argparse
import math

import torch

from memory_test.cli_common.errors import ToolError
from memory_test.diffusion.latent_dataset import LatentDataset
from memory_test.models.dit_presets import build_dit_config


def open_latents(path: str) -> LatentDataset:
    """The latent dataset, or a ToolError naming the file and how to get a good one."""
    try:
        return LatentDataset(path)
    except (OSError, ValueError) as e:
        raise ToolError(
            f"--latents {e}", "re-create it with `python -m memory_test.diffusion.latent_dataset`"
        ) from None


def check_dataset(dataset: LatentDataset, delta: float) -> None:
    """Catch RGB data and a δ too large to mean anything before any model is built."""
    channels = dataset.latent_shape[0]
    if channels != 4:
        raise ToolError(
            f"{dataset.path} holds {channels}-channel tensors, DiT needs 4-channel SD VAE latents",
            "these look like RGB images: encode them first with `python -m memory_test.diffusion.latent_dataset`"
            if channels == 3
            else "encode the images with `python -m memory_test.diffusion.latent_dataset`",
        )
    if not 0 < delta < 1 / len(dataset):
        raise ToolError(
            f"--delta {delta} must be in (0, 1/N) = (0, {1 / len(dataset):.3g}) for N={len(dataset)}",
            f"pass a smaller δ, e.g. --delta {10 ** math.floor(math.log10(0.1 / len(dataset))):g}",
        )


def check_batch_fits(dataset: LatentDataset, batch_size: int) -> None:
    """The expected batch is q·N with q = 1/ceil(N/B) <= 1: a --batch-size above N cannot be drawn (q would be 1
    and Opacus' accountant warns about it)."""
    if batch_size > len(dataset):
        raise ToolError(
            f"--batch-size {batch_size} exceeds the {len(dataset)} samples of {dataset.path}: Poisson sampling "
            f"draws each sample at most once a step, so the expected batch is at most {len(dataset)}",
            f"use --batch-size {len(dataset)} or less",
        )


def check_model_fits(model: str, dataset: LatentDataset) -> None:
    """The DiT can be built for this latent file (its image size, channels and classes)."""
    try:
        build_dit_config(model, dataset.image_size, None, dataset.latent_shape[0], dataset.num_classes)
    except ValueError as e:
        raise ToolError(f"--model {model} does not fit {dataset.path}: {e}", "pick another --model") from None


def build_model(args: argparse.Namespace, dataset: LatentDataset) -> torch.nn.Module:
    """The DiT wrapper sized for the dataset: its image size and class count."""
    from memory_test.models.dit_huggingface_wrapper import DiTHuggingFaceWrapper

    return DiTHuggingFaceWrapper(
        model_name=args.model,
        img_size=dataset.image_size,
        in_channels=dataset.latent_shape[0],
        num_classes=dataset.num_classes,
        pretrained=args.pretrained,
        pretrained_path=args.pretrained_path,
        use_flash_attention=not args.no_flash_attention,
        class_dropout_prob=args.class_dropout,
    )


def probe_batch(dataset: LatentDataset, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed subset for the loss probe (its latents and labels)."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return dataset.latents[idx].float(), dataset.labels[idx]
