"""DiT's training objective: noise the clean latent at a random t, regress the noise; K draws per sample (DPDM)."""

from __future__ import annotations

import torch


class NoiseSchedule:
    """DDPM's forward process with DiT's linear beta schedule (diffusers ``DDPMScheduler(beta_schedule="linear")``)."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_train_timesteps = num_train_timesteps
        # float64 as in DiT's gaussian_diffusion.py; cast only when applied.
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps, per row of t."""
        abar = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        return (abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps).to(x0.dtype)


DEFAULT_SCHEDULE = NoiseSchedule()


def make_noisy_batch(
    x0: torch.Tensor,
    labels: torch.Tensor,
    K: int = 1,
    generator: torch.Generator | None = None,
    schedule: NoiseSchedule = DEFAULT_SCHEDULE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, labels_rep, eps) with B*K rows in sample-major order, t and eps drawn independently for every row."""
    if K < 1:
        raise ValueError(f"noise multiplicity K must be >= 1, got {K}")
    if labels.shape[0] != x0.shape[0]:
        raise ValueError(f"{x0.shape[0]} latents but {labels.shape[0]} labels")
    x0 = x0.repeat_interleave(K, dim=0)
    labels = labels.repeat_interleave(K, dim=0)
    n = x0.shape[0]
    # Draw where the generator lives (a CPU generator cannot fill CUDA tensors), then move.
    draw_device = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator, device=draw_device)
    eps = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype)
    t, eps = t.to(x0.device), eps.to(x0.device)
    return schedule.add_noise(x0, eps, t), t, labels, eps


class EpsilonMSECriterion:
    """Per-sample loss (B,): MSE between predicted and true noise, averaged over each sample's K consecutive rows.

    Averaging the K draws inside the per-sample loss (before clipping) is what makes them free privacy-wise:
    one sample still contributes one clipped gradient. ``reduction = "mean"``: the batch loss is the mean of these.
    """

    def __init__(self, noise_multiplicity: int = 1):
        if noise_multiplicity < 1:
            raise ValueError(f"noise multiplicity K must be >= 1, got {noise_multiplicity}")
        self.noise_multiplicity = noise_multiplicity
        self.reduction = "mean"

    def __call__(self, pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if pred.shape != eps.shape:
            hint = ""
            if pred.dim() == eps.dim() and pred.shape[1] == 2 * eps.shape[1]:
                hint = (
                    f" The model returns {pred.shape[1]} channels (noise and learned sigma): regress the noise "
                    f"only, `pred[:, :{eps.shape[1]}]` (DiTHuggingFaceWrapper does this for you)."
                )
            raise ValueError(f"prediction {tuple(pred.shape)} and noise {tuple(eps.shape)} differ.{hint}")
        K = self.noise_multiplicity
        if pred.shape[0] % K:
            raise ValueError(f"{pred.shape[0]} rows are not a multiple of the noise multiplicity K={K}")
        # At least fp32: under bf16 autocast a mean over 4*32*32 elements loses digits the clipping depends on;
        # float64 inputs stay float64 (exactness tests compare to 1e-9).
        dtype = torch.promote_types(torch.promote_types(pred.dtype, eps.dtype), torch.float32)
        per_row = (pred.to(dtype) - eps.to(dtype)).pow(2).flatten(1).mean(1)
        return per_row.view(-1, K).mean(1)
