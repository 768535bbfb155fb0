"""``backward()`` twice on one DP loss: the engine's own one-line error (not torch's "backward through the graph a
second time"), nothing runs, and the next optimizer step is refused (no update, no accounting) until zero_grad."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memory_test.privacy import MODES, CriterionError, PrivacyConfigError, PrivacyEngine
from tests.conftest import per_sample_mse

MODES_UNDER_TEST = sorted(name for name, m in MODES.items() if not m.distributed)
F64 = torch.float64
ONLY_THE_ERROR = r"^backward\(\) ran a second time on one DP loss: .*per batch\)\.$"  # hooks: no step guard
SECOND = r"^backward\(\) ran a second time on one DP loss: .* The next optimizer\.step\(\) is refused: call"


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _private(net, mode):
    engine = PrivacyEngine()
    model, opt, crit, _ = engine.make_private(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(torch.zeros(4)), batch_size=4), criterion=per_sample_mse,
        noise_multiplier=0.0, max_grad_norm=0.05, grad_sample_mode=mode, poisson_sampling=False,
    )  # fmt: skip
    return engine, model, opt, crit


def _data(seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 5, generator=gen, dtype=F64), torch.randn(4, 3, generator=gen, dtype=F64)


def _assert_refused_then_recovers(engine, net, model, opt, crit, before):
    """The step names the second backward, changes nothing and accounts nothing; after zero_grad a fresh batch
    trains and is accounted once."""
    grads = [p.grad.clone() for p in net.parameters()]
    with pytest.raises(PrivacyConfigError, match=r"refusing the optimizer step: .*CriterionError: "):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert engine.accountant.history == []
    opt.zero_grad()
    x, target = _data(6)
    crit(model(x), target).backward()
    opt.step()
    assert len(engine.accountant.history) == 1
    assert all(g.abs().sum() > 0 for g in grads)  # the first backward had run: the refusal is about the second


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
@pytest.mark.parametrize("second", ["same", "combined"])
def test_second_backward_on_one_dp_loss_is_the_engines_error_and_refuses_the_step(mode, second):
    """``combined``: a loss made from the spent one (``loss * 1.0``) runs through the same graph, refused alike."""
    net = _net()
    engine, model, opt, crit = _private(net, mode)
    before = [p.detach().clone() for p in net.parameters()]
    x, target = _data()
    loss = crit(model(x), target)
    loss.backward()
    again = loss if second == "same" else loss * 1.0
    with pytest.raises(CriterionError, match=SECOND) as caught:
        again.backward()
    assert "\n" not in str(caught.value)
    assert caught.value.__cause__ is None  # raised before any backward ran, not translated from torch's
    _assert_refused_then_recovers(engine, net, model, opt, crit, before)


@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_backward_on_the_loss_a_combined_loss_was_made_from_is_refused(mode):
    net = _net()
    engine, model, opt, crit = _private(net, mode)
    before = [p.detach().clone() for p in net.parameters()]
    x, target = _data()
    loss = crit(model(x), target)
    (loss + 0.0).backward()
    with pytest.raises(CriterionError, match=SECOND):
        loss.backward()
    _assert_refused_then_recovers(engine, net, model, opt, crit, before)


def _single_linear():
    torch.manual_seed(0)
    return nn.Linear(5, 3).double()


def _compiled_after_two_steps(engine, model, opt, crit) -> None:
    """Compiled (sink recording): the eager shape pass, then a compiled step; the accountant starts afresh."""
    model.compile(backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x, target = _data(7)
        crit(model(x), target).backward()
        opt.step()
        opt.zero_grad()
    engine.accountant.history.clear()


# (the model, whether it is compiled): torch raises on the two-layer net's freed graph, not on one Linear's
# (book-keeping would add the first loss' clipped gradients again, halved, accounted twice); compiled, the forward's
# taps are spent.
TWO_LOSS_CASES = {"net": (_net, False), "one Linear": (_single_linear, False), "compiled": (_net, True)}


@pytest.mark.parametrize("case", TWO_LOSS_CASES)
@pytest.mark.parametrize("mode", MODES_UNDER_TEST)
def test_two_dp_losses_of_one_forward_give_the_engines_error(mode, case):
    """The second loss is a new DP loss, but its backward reaches the forward the first one spent: whichever sees it
    first (the engine's spent-use check, or torch's freed graph, kept as the cause), the message is the engine's and
    the step is refused."""
    make_net, compiled = TWO_LOSS_CASES[case]
    torch._dynamo.reset()
    net = make_net()
    engine, model, opt, crit = _private(net, mode)
    if compiled:
        _compiled_after_two_steps(engine, model, opt, crit)
    before = [p.detach().clone() for p in net.parameters()]
    x, target = _data()
    out = model(x)
    first, second = crit(out, target), crit(out, target)
    first.backward()
    with pytest.raises(CriterionError, match=r"^the DP loss's backward reached a forward that an earlier") as caught:
        second.backward()
    assert caught.value.__cause__ is None or isinstance(caught.value.__cause__, RuntimeError)
    _assert_refused_then_recovers(engine, net, model, opt, crit, before)
    torch._dynamo.reset()


def test_upstream_hooks_refuse_the_second_backward_and_keep_the_first_update():
    """Upstream ``hooks`` has no step guard: the second backward is refused before it adds per-sample gradients
    again, so the step is the first backward's (the same as one backward alone)."""
    updates = []
    for twice in (False, True):
        net = _net()
        _, model, opt, crit = _private(net, "hooks")
        before = [p.detach().clone() for p in net.parameters()]
        x, target = _data()
        loss = crit(model(x), target)
        loss.backward()
        if twice:
            with pytest.raises(CriterionError, match=ONLY_THE_ERROR):
                loss.backward()
        opt.step()
        updates.append([b - p.detach() for b, p in zip(before, net.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*updates))
