"""The diffusion objective: DiT's schedule, x_t construction, K-row layout and the per-sample criterion."""

import pytest
import torch
from diffusers import DDPMScheduler

from memory_test.diffusion.objective import DEFAULT_SCHEDULE, EpsilonMSECriterion, make_noisy_batch


def test_schedule_matches_diffusers_ddpm_linear():
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    torch.testing.assert_close(DEFAULT_SCHEDULE.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-6)


def test_add_noise_matches_diffusers():
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    x0, eps = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    torch.testing.assert_close(DEFAULT_SCHEDULE.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)


def test_noisy_batch_layout_is_sample_major_with_independent_draws():
    B, K = 3, 4
    x0 = torch.randn(B, 4, 8, 8)
    labels = torch.tensor([7, 1, 5])
    x_t, t, y, eps = make_noisy_batch(x0, labels, K, generator=torch.Generator().manual_seed(0))
    assert x_t.shape == (B * K, 4, 8, 8) and t.shape == (B * K,) and eps.shape == x_t.shape
    assert y.tolist() == [7] * K + [1] * K + [5] * K
    # x_t is built from the sample's own x0, row by row.
    expected = DEFAULT_SCHEDULE.add_noise(x0.repeat_interleave(K, 0), eps, t)
    torch.testing.assert_close(x_t, expected)
    # K draws of one sample are independent: distinct t (w.h.p.) and distinct noise.
    assert not torch.equal(eps[0], eps[1])
    assert len(set(t.tolist())) > B


def test_noisy_batch_is_reproducible_from_generator():
    x0, y = torch.randn(2, 4, 4, 4), torch.tensor([0, 1])
    a = make_noisy_batch(x0, y, 2, generator=torch.Generator().manual_seed(3))
    b = make_noisy_batch(x0, y, 2, generator=torch.Generator().manual_seed(3))
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def test_timesteps_cover_the_whole_range():
    x0, y = torch.zeros(5000, 1, 1, 1), torch.zeros(5000, dtype=torch.long)
    _, t, _, _ = make_noisy_batch(x0, y, 1, generator=torch.Generator().manual_seed(0))
    assert t.min().item() == 0 and t.max().item() == 999


def test_criterion_averages_each_samples_k_rows():
    B, K = 3, 2
    crit = EpsilonMSECriterion(K)
    assert crit.reduction == "mean"
    pred, eps = torch.randn(B * K, 4, 2, 2), torch.randn(B * K, 4, 2, 2)
    loss = crit(pred, eps)
    assert loss.shape == (B,)
    per_row = ((pred - eps) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, per_row.view(B, K).mean(1))


def test_criterion_k1_is_plain_per_sample_mse():
    pred, eps = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3)
    expected = torch.nn.functional.mse_loss(pred, eps, reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(EpsilonMSECriterion()(pred, eps), expected)


def test_criterion_explains_eight_channel_output():
    with pytest.raises(ValueError, match=r"pred\[:, :4\]"):
        EpsilonMSECriterion()(torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4))


def test_criterion_rejects_rows_not_multiple_of_k():
    with pytest.raises(ValueError, match="multiple of the noise multiplicity"):
        EpsilonMSECriterion(3)(torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2))


def test_criterion_survives_engine_reduction_toggle():
    # The engine sets criterion.reduction = "none" around the call; the criterion must still return (B,).
    crit = EpsilonMSECriterion(2)
    crit.reduction = "none"
    assert crit(torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)).shape == (2,)


def test_invalid_k():
    with pytest.raises(ValueError):
        EpsilonMSECriterion(0)
    with pytest.raises(ValueError):
        make_noisy_batch(torch.zeros(1, 4, 2, 2), torch.zeros(1, dtype=torch.long), 0)
