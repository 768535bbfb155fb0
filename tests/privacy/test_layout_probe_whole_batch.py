"""The layout check probes the whole batch: a model that mixes or reorders rows only beyond row 3, or only for
batches of more than 3 rows, is refused at its first forward (a probe of 3 rows saw a per-sample model and let it
train non-privately); the probe costs three no-grad forwards of the batch, once."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memory_test.privacy import MODES, LayoutError, NonFiniteSampleError, PrivacyEngine, layout_check
from memory_test.privacy.reference import clipped_sum, per_sample_gradients
from tests.conftest import per_sample_mse

MODES_UNDER_TEST = sorted(name for name, m in MODES.items() if not m.distributed)
F64 = torch.float64
C = 0.05


class _MixesBeyondRow3(nn.Module):
    """Row i + 3 of ``b``'s input gets half of row i: nothing is mixed in a batch of at most 3 rows."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(torch.cat([h[:3], h[3:] + 0.5 * h[:-3]]))


class _RollsLargeBatches(nn.Module):
    """``a`` sees the batch rolled by one row (then rolled back) only when the batch has more than 3 rows."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        if x.shape[0] <= 3:
            return self.b(torch.tanh(self.a(x)))
        return self.b(torch.tanh(self.a(x.roll(1, 0))).roll(-1, 0))


class _Flips(nn.Module):
    """``a`` sees the batch upside down (then flipped back): with two rows, a swap."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.flip(0))).flip(0))


def _build(cls):
    torch.manual_seed(0)
    return cls().double()


def _private(net, mode, rows):
    engine = PrivacyEngine()
    model, opt, crit, _ = engine.make_private(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(torch.zeros(rows)), batch_size=rows), criterion=per_sample_mse,
        noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode, poisson_sampling=False,
    )  # fmt: skip
    return engine, model, opt, crit


def _data(rows, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 5, generator=gen, dtype=F64), torch.randn(rows, 3, generator=gen, dtype=F64)


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
@pytest.mark.parametrize(("cls", "layer"), [(_MixesBeyondRow3, "b"), (_RollsLargeBatches, "a")])
def test_mixing_or_reordering_beyond_row_3_is_refused_before_any_update(mode, cls, layer):
    net = _build(cls)
    engine, model, opt, _ = _private(net, mode, 6)
    before = [p.detach().clone() for p in net.parameters()]
    x, _ = _data(6)
    with pytest.raises(LayoutError, match=rf"^{layer} \(Linear\): its rows do not follow the batch"):
        model(x)
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert engine.accountant.history == []


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
@pytest.mark.parametrize("cls", [_MixesBeyondRow3, _RollsLargeBatches])
def test_the_same_models_on_3_rows_are_per_sample_and_exact(mode, cls):
    """What a 3-row probe saw: on 3 rows these models keep every sample apart, so the engine must give the
    one-sample-at-a-time clipped update (the refusal above comes from the rows beyond 3, nothing else)."""
    net = _build(cls)
    x, target = _data(3)
    grads = per_sample_gradients(net, lambda i: per_sample_mse(net(x[i : i + 1]), target[i : i + 1])[0], 3)
    want = [g / 3 for g in clipped_sum(grads, C)]
    before = [p.detach().clone() for p in net.parameters()]
    _, model, opt, crit = _private(net, mode, 3)
    crit(model(x), target).backward()
    opt.step()
    got = [b - p.detach() for b, p in zip(before, net.parameters())]
    err = torch.sqrt(sum((g - w).pow(2).sum() for g, w in zip(got, want)))
    assert (err / torch.sqrt(sum(w.pow(2).sum() for w in want))).item() < 1e-9


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_a_swap_of_a_two_row_batch_is_refused(mode):
    """No permutation of two rows tells a swap from the identity: two rows are probed as (a, b, a)."""
    _, model, _, _ = _private(_build(_Flips), mode, 2)
    with pytest.raises(LayoutError, match=r"^a \(Linear\): its rows do not follow the batch"):
        model(_data(2)[0])


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_mixing_beyond_row_3_is_refused_when_the_first_batch_has_a_nan_row(mode):
    """Non-finite rows are left out of the probe; the 5 finite rows of 6 still show the mixing."""
    _, model, _, _ = _private(_build(_MixesBeyondRow3), mode, 6)
    x, _ = _data(6)
    x[1] = float("nan")
    with pytest.raises(LayoutError, match=r"^b \(Linear\): its rows do not follow the batch"):
        model(x)


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_a_per_sample_model_with_a_nan_row_passes_the_probe_and_the_step_is_refused_for_the_nan(mode):
    net = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    engine, model, opt, crit = _private(net, mode, 6)
    x, target = _data(6)
    x[4] = float("nan")
    crit(model(x), target).backward()
    with pytest.raises(NonFiniteSampleError, match=r"rows \[4\]"):
        opt.step()
    assert engine.accountant.history == []


def test_the_probe_is_three_forwards_of_the_whole_batch_once():
    """Its cost: the batch as given and under two permutations, no gradient, on the first recorded forward only."""
    net = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append((args[0].shape[0], torch.is_grad_enabled())))
    _, model, opt, crit = _private(net, "bookkeeping", 7)
    for step in range(2):
        x, target = _data(7, seed=step)
        crit(model(x), target).backward()
        opt.step()
        opt.zero_grad()
    assert seen == [(7, False)] * layout_check.PROBE_FORWARDS + [(7, True), (7, True)]


def test_check_permutations_generate_every_permutation():
    """An m-cycle and a transposition: the group they generate has m! elements (for m = 3..6)."""
    for m in range(3, 7):
        gens = [tuple(p) for p in layout_check.check_permutations(m)]
        group, frontier = {tuple(range(m))}, [tuple(range(m))]
        while frontier:
            new = {tuple(g[p[i]] for i in range(m)) for p in frontier for g in gens} - group
            group |= new
            frontier = list(new)
        assert len(group) == math.factorial(m)


def test_fingerprint_chunks_add_up_to_the_whole(monkeypatch):
    rows = torch.randn(4, 1001, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    whole = layout_check._weighted_sums(rows)
    monkeypatch.setattr(layout_check, "FINGERPRINT_CHUNK", 4 * 37)
    chunked = layout_check._weighted_sums(rows)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    gen = torch.Generator().manual_seed(1001)
    w = torch.rand(1001, generator=gen, dtype=F64) + 0.5
    torch.testing.assert_close(whole[0], rows.double() @ w, rtol=1e-12, atol=0)
