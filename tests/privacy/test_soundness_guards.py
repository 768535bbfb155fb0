"""What stands between a user's habits and a silently non-private step: parameter checks, NaN samples, zero_grad,
noise law, failed backward passes, batch statistics, checkpointing — in every mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memory_test.diffusion.objective import EpsilonMSECriterion
from memory_test.privacy import (
    MODES,
    CoverageError,
    NonFiniteSampleError,
    PrivacyConfigError,
    PrivacyEngine,
    PrivacyParameterError,
)
from tests.conftest import per_sample_mse

MODES_UNDER_TEST = sorted(name for name, m in MODES.items() if not m.distributed)
N = 4


def _private(model, mode, *, engine=None, n=N, params=None, **kwargs):
    kwargs = {"noise_multiplier": 0.0, "max_grad_norm": 1.0, "poisson_sampling": False, **kwargs}
    optimizer = torch.optim.SGD(params if params is not None else model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.zeros(n)), batch_size=n)
    engine = engine or PrivacyEngine()
    return engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, criterion=per_sample_mse, grad_sample_mode=mode, **kwargs
    )


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


INVALID = [
    (1.0, -1.0),
    (1.0, 0.0),
    (1.0, float("nan")),
    (1.0, float("inf")),
    (-1.0, 1.0),
    (float("nan"), 1.0),
    (float("inf"), 1.0),
    ("1", 1.0),
]


@pytest.mark.parametrize("mode", [*MODES_UNDER_TEST, "hooks"])
@pytest.mark.parametrize(("sigma", "c"), INVALID)
def test_invalid_sigma_or_c_is_refused_at_make_private(mode, sigma, c):
    with pytest.raises(PrivacyParameterError, match="must be a finite number"):
        _private(_mlp(), mode, noise_multiplier=sigma, max_grad_norm=c)


BAD_TARGETS = [(0.0, 1e-5), (-1.0, 1e-5), (float("inf"), 1e-5), (float("nan"), 1e-5), (1.0, 0.0), (1.0, 1.0)]


@pytest.mark.parametrize(("epsilon", "delta"), BAD_TARGETS)
def test_invalid_target_epsilon_or_delta_is_refused(epsilon, delta):
    model = _mlp()
    loader = DataLoader(TensorDataset(torch.zeros(16)), batch_size=4)
    with pytest.raises(PrivacyParameterError):
        PrivacyEngine().make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            criterion=per_sample_mse, target_epsilon=epsilon, target_delta=delta, epochs=1, max_grad_norm=1.0,
            grad_sample_mode="bookkeeping",
        )  # fmt: skip


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_sigma_zero_is_an_explicit_non_private_run_with_infinite_epsilon(mode):
    engine = PrivacyEngine()
    model, opt, crit, _ = _private(_mlp(), mode, engine=engine)
    crit(model(torch.randn(N, 3)), torch.randn(N, 2)).backward()
    opt.step()
    assert engine.get_epsilon(1e-5) == math.inf


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_noise_changed_on_the_optimizer_to_an_invalid_value_refuses_the_step(mode):
    model, opt, crit, _ = _private(_mlp(), mode, noise_multiplier=1.0)
    opt.noise_multiplier = -1.0
    crit(model(torch.randn(N, 3)), torch.randn(N, 2)).backward()
    with pytest.raises(PrivacyParameterError, match="refusing to step"):
        opt.step()


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_sample_refuses_the_step_names_the_rows_and_accounts_nothing(mode, bad):
    engine = PrivacyEngine()
    net = _mlp()
    model, opt, crit, _ = _private(net, mode, engine=engine, noise_multiplier=1.0)
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(N, 3)
    x[2, 1] = bad
    crit(model(x), torch.randn(N, 2)).backward()
    with pytest.raises(NonFiniteSampleError, match=r"rows \[2\]"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert engine.accountant.history == []  # no noise was added, so nothing is accounted
    opt.zero_grad()  # the user drops the batch and carries on
    crit(model(torch.randn(N, 3)), torch.randn(N, 2)).backward()
    opt.step()
    assert not all(torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert len(engine.accountant.history) == 1


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
@pytest.mark.parametrize("set_to_none", [False, True])
def test_zero_grad_either_way_works_for_three_steps(mode, set_to_none):
    torch.manual_seed(0)
    net = _WithUnused()
    model, opt, crit, _ = _private(net, mode, noise_multiplier=0.5)
    for _ in range(3):
        crit(model(torch.randn(N, 3)), torch.randn(N, 2)).backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_gradient_left_from_the_last_step_is_still_refused(mode):
    """The zero_grad fix must not hide Opacus' guard: without any zero_grad the old noisy gradient is refused."""
    model, opt, crit, _ = _private(_WithUnused(), mode, noise_multiplier=0.5)
    crit(model(torch.randn(N, 3)), torch.randn(N, 2)).backward()
    opt.step()
    crit(model(torch.randn(N, 3)), torch.randn(N, 2)).backward()
    with pytest.raises(ValueError, match="haven't been cleared"):
        opt.step()


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_noise_std_is_sigma_c_over_the_expected_batch(mode):
    torch.manual_seed(0)
    net = nn.Linear(50, 40, bias=False)
    sigma, c, n = 2.0, 0.5, 8
    model, opt, crit, _ = _private(net, mode, noise_multiplier=sigma, max_grad_norm=c, n=n)
    crit(model(torch.zeros(n, 50)), torch.zeros(n, 40)).backward()  # zero gradient: p.grad is pure noise
    opt.pre_step()
    noise = net.weight.grad.flatten()
    expected = sigma * c / n
    # 2000 draws: the sample std is within 6% of the truth with overwhelming probability (> 5 sigma).
    assert abs(noise.std().item() / expected - 1) < 0.06
    assert abs(noise.mean().item()) < 5 * expected / noise.numel() ** 0.5


class _FunctionalTie(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(5, 4), nn.Linear(4, 4)

    def forward(self, idx):
        return self.lin(self.emb(idx)) @ self.emb.weight.t()


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_a_failed_backward_makes_the_next_step_refuse(mode):
    net = _FunctionalTie()
    model, opt, crit, _ = _private(net, mode)
    before = [p.detach().clone() for p in net.parameters()]
    idx = torch.randint(0, 5, (N, 3))
    with pytest.raises(CoverageError, match=r"emb\.weight .*outside any layer"):
        crit(model(idx), torch.randn(N, 3, 5)).backward()
    with pytest.raises(PrivacyConfigError, match="refusing the optimizer step"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_unfreezing_after_make_private_is_refused(mode):
    net = _mlp()
    net[0].weight.requires_grad_(False)
    model, opt, crit, _ = _private(net, mode, params=[p for p in net.parameters() if p.requires_grad])
    net[0].weight.requires_grad_(True)
    with pytest.raises(CoverageError, match=r"requires_grad changed after make_private for 0\.weight"):
        crit(model(torch.randn(N, 3)), torch.randn(N, 2)).backward()


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_frozen_batch_norm_in_train_mode_is_refused(mode):
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    net[1].requires_grad_(False)
    model, _, crit, _ = _private(net, mode)
    with pytest.raises(PrivacyConfigError, match="batch statistics"):
        model(torch.randn(N, 3))
    net[1].eval()  # running statistics: samples stay separate
    crit(model(torch.randn(N, 3)), torch.randn(N, 2)).backward()


def test_epsilon_mse_keeps_float64():
    pred, eps = torch.randn(6, 4, 2, 2, dtype=torch.float64), torch.randn(6, 4, 2, 2, dtype=torch.float64)
    got = EpsilonMSECriterion(3)(pred, eps)
    want = (pred - eps).pow(2).flatten(1).mean(1).view(-1, 3).mean(1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
