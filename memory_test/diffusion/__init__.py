"""VAE latents, the DiT diffusion objective with noise multiplicity, and precomputed latent datasets."""

from .objective import EpsilonMSECriterion, NoiseSchedule, make_noisy_batch

__all__ = ["EpsilonMSECriterion", "NoiseSchedule", "make_noisy_batch"]
