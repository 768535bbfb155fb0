"""The record's privacy block: σ, C, and ε at the stated δ for q = B/N over ceil(epochs·N/B) steps."""

from __future__ import annotations

import math

from memory_test.records.record import Privacy, RunConfig

PRIVACY_UNIT = "one image (its K noise draws are averaged inside its per-sample loss)"
ASSUMPTION = (
    "ε is for DP-SGD with Poisson sampling at rate q = batch_size/dataset_size for `steps` steps; the benchmark "
    "itself feeds a fixed batch (no sampling), which does not change memory or time"
)


def privacy_block(config: RunConfig) -> Privacy | None:
    """None for non-private experiments. ε is never written as a number for noise that is not added (σ = 0)."""
    if not config.private:
        return None
    n, b = config.dataset_size, config.global_batch_size  # N·B under torchrun
    q = b / n
    steps = math.ceil(config.epochs * n / b)
    sigma = config.noise_multiplier
    block = Privacy(
        noise_multiplier=sigma,
        max_grad_norm=config.max_grad_norm,
        noise_std=sigma * config.max_grad_norm,
        delta=config.delta,
        dataset_size=n,
        batch_size=b,
        sample_rate=q,
        epochs=config.epochs,
        steps=steps,
        accountant=config.accountant,
        privacy_unit=PRIVACY_UNIT,
        assumption=ASSUMPTION,
    )
    if sigma == 0:  # no noise: ε is infinite, which JSON cannot hold; null plus the reason, never a number
        return block.replace(
            epsilon_infinite=True,
            epsilon_note="noise_multiplier 0: no noise is added, so there is no privacy (ε is infinite)",
        )
    epsilon, note = _epsilon(config.accountant, sigma, q, steps, config.delta)
    return block.replace(epsilon=epsilon, epsilon_note=note)


def _epsilon(accountant: str, sigma: float, q: float, steps: int, delta: float) -> tuple[float | None, str | None]:
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [(sigma, q, steps)]
    try:
        return float(acc.get_epsilon(delta=delta)), None
    except Exception as e:  # the accountant's own limits (e.g. PRV domain): keep the run, say why
        return None, f"{accountant} accountant failed: {type(e).__name__}: {e}"
