"""The training step every experiment shares: draw (t, ε) for the fixed batch, noise it (DiT's epsilon objective),
forward, per-sample loss, backward, ``optimizer.step()``, ``zero_grad()``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from memory_test.diffusion.objective import NoiseSchedule, make_noisy_batch
from memory_test.diffusion_profile.suite.experiments import Prepared


def make_train_step(
    prepared: Prepared,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    noise_multiplicity: int,
    autocast_dtype: torch.dtype | None,
    seed: int,
) -> Callable[[], torch.Tensor]:
    """One DP-SGD (or plain) step on the fixed batch; returns the detached mean loss. No host synchronisation."""
    device = x0.device
    schedule = NoiseSchedule()
    schedule.alphas_cumprod = schedule.alphas_cumprod.to(device)  # no host->device copy inside the step
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    model, opt, loss_fn = prepared.model, prepared.optimizer, prepared.loss_fn

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    def step() -> torch.Tensor:
        x_t, t, y, eps = make_noisy_batch(x0, labels, noise_multiplicity, generator=gen, schedule=schedule)
        with autocast():
            pred = model(x_t, t, y)
        loss = loss_fn(pred, eps)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step
