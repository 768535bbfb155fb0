"""DP-SGD training of a DiT on pre-computed VAE latents: ``python -m memory_test.train`` (the old path
``python -m memory_test.diffusion_profile.train_dp`` runs the same).

- ``args``: the flags and every check made before any work; ``data``: the latent file and the model it fits.
- ``checkpoint``: atomic checkpoints, and a resume that must describe the same privacy mechanism.
- ``loop``: the epochs, physical batches inside logical (Poisson) batches, the per-epoch ledger line.
- ``run``: ``train()`` from start (or resume) to the final (ε, δ), and ``main()``.
"""
