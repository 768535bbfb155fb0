"""Engine behaviour other than exactness: bad inputs, noise, accounting, one-pass book-keeping."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from memory_test.privacy import (
    MODES,
    CriterionError,
    PrivacyConfigError,
    PrivacyEngine,
    SharedParameterError,
    UnsupportedLayerError,
    describe_layers,
    resolve_mode,
    valid_mode_names,
)
from tests.conftest import TinyDiT, make_batch, per_sample_mse
from tests.conftest import make_private as _make_private

SINGLE_PROCESS_MODES = sorted(name for name, m in MODES.items() if not m.distributed)


def test_registry_names_and_aliases():
    assert resolve_mode("ghost_bk") is MODES["bookkeeping"]
    assert {"ghost", "bookkeeping", "ghost_bk", "hooks"} <= set(valid_mode_names())
    with pytest.raises(ValueError, match="valid:.*bookkeeping.*ghost"):
        resolve_mode("ghots")


def test_unknown_mode_lists_valid_names():
    with pytest.raises(ValueError, match="unknown grad_sample_mode 'nope'; valid: "):
        _make_private(nn.Linear(3, 2), mode="nope")


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES + ["hooks"])
def test_returns_four_objects_for_every_mode(mode):
    out = _make_private(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), mode=mode)
    assert len(out) == 4


def test_criterion_without_reduction_is_rejected():
    def crit(pred, target):
        return (pred - target).pow(2).mean(1)

    with pytest.raises(CriterionError, match=r"criterion.reduction = 'mean'"):
        _make_private(nn.Linear(3, 2), criterion=crit)


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES + ["hooks"])
def test_scalar_loss_criterion_is_rejected_with_the_fix(mode):
    def crit(pred, target):
        return (pred - target).pow(2).mean()

    crit.reduction = "mean"
    model, _, criterion, _ = _make_private(nn.Linear(3, 2), mode=mode, criterion=crit)
    with pytest.raises(CriterionError, match=r"shape \(B,\).*flatten\(1\)\.mean\(1\)"):
        criterion(model(torch.randn(4, 3)), torch.randn(4, 2))


def test_reduction_mismatch_is_rejected():
    with pytest.raises(CriterionError, match="make them agree"):
        _make_private(nn.Linear(3, 2), loss_reduction="sum")


def test_unsupported_trainable_layer_fails_at_make_private():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.s

    with pytest.raises(UnsupportedLayerError, match=r"1 \(Scale\)"):
        _make_private(nn.Sequential(nn.Linear(3, 3), Scale()))


def test_tied_parameter_between_modules_is_rejected():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(SharedParameterError, match="shared between different modules"):
        _make_private(nn.Sequential(a, b))


def test_layer_norm_and_group_norm_affine_are_exact():
    """Affine norms take the materialised path; the update still matches autograd when nothing is clipped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Unflatten(1, (4, 2)), nn.GroupNorm(2, 4)).double()
    x, target = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 4, 2, dtype=torch.float64)
    want = torch.autograd.grad(per_sample_mse(model(x), target).mean(), list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    dp_model, opt, crit, _ = _make_private(model, max_grad_norm=1e9)
    crit(dp_model(x), target).backward()
    opt.step()
    for b, p, w in zip(before, model.parameters(), want):
        torch.testing.assert_close(b - p.detach(), w, rtol=1e-10, atol=1e-12)


class _CountWeightGradGemms(TorchDispatchMode):
    """Counts matrix products whose output has the shape of some Linear weight (a weight-gradient GEMM)."""

    def __init__(self, weight_shapes):
        super().__init__()
        self.weight_shapes, self.count = weight_shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm) and tuple(out.shape) in self.weight_shapes:
            self.count += 1
        return out


def test_bookkeeping_backward_skips_unclipped_weight_gradients():
    """The recording backward reaches no AccumulateGrad and runs no weight-gradient GEMM."""
    model = TinyDiT().train()
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)}
    shapes |= {tuple(reversed(s)) for s in shapes}
    dp_model, _, crit, _ = _make_private(model, n=3)
    accumulated = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: accumulated.append(p))
    x, t, y, target = make_batch(3, dtype=torch.float32)  # 3 and 12 rows: no activation shape equals a weight's
    loss = crit(dp_model(x, t, y), target)
    with _CountWeightGradGemms(shapes) as counter:
        dp_model.record_norms(loss.loss_per_sample, retain_graph=False)
    assert counter.count == 0 and accumulated == []
    with _CountWeightGradGemms(shapes) as control:  # the counter does see weight gradients of a plain backward
        per_sample_mse(model(x, t, y), target).sum().backward()
    assert control.count > 0
    model.zero_grad(set_to_none=True)
    dp_model.write_clipped_grads(torch.ones(3))
    assert all(p.grad is not None for p in model.parameters())


def test_noise_has_std_sigma_c_over_expected_batch():
    torch.manual_seed(0)
    model = nn.Linear(50, 40, bias=False)
    sigma, c, n = 2.0, 0.5, 8
    dp_model, opt, crit, _ = _make_private(model, noise_multiplier=sigma, max_grad_norm=c, n=n)
    x = torch.zeros(n, 50)  # zero inputs: zero gradient, so p.grad is pure noise
    crit(dp_model(x), torch.zeros(n, 40)).backward()
    opt.pre_step()  # noise and scaling, without the SGD step
    noise = model.weight.grad.flatten()
    expected = sigma * c / n
    # 2000 draws: the sample std is within 5% of the truth with overwhelming probability.
    assert abs(noise.std().item() / expected - 1) < 0.05
    assert abs(noise.mean().item()) < 4 * expected / noise.numel() ** 0.5


def test_noise_generator_makes_noise_reproducible_and_epsilon_is_reported():
    grads = []
    for _ in range(2):
        torch.manual_seed(0)
        engine = PrivacyEngine()
        model = nn.Linear(4, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        loader = DataLoader(TensorDataset(torch.zeros(64)), batch_size=8)
        dp_model, opt, crit, _ = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=per_sample_mse,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="bookkeeping",
            noise_generator=torch.Generator().manual_seed(3),
        )
        crit(dp_model(torch.randn(8, 4)), torch.randn(8, 3)).backward()
        opt.pre_step()
        grads.append(model.weight.grad.clone())
        opt.original_optimizer.step()
        assert engine.get_epsilon(1e-5) > 0
    assert torch.equal(grads[0], grads[1])


def test_noise_chunks_draw_the_same_stream_as_one_normal_per_chunk(monkeypatch):
    """Noise in several chunks (cached plan, reused across steps): each chunk is one normal_ draw, in order."""
    from memory_test.privacy import optimizer as fused

    monkeypatch.setattr(fused, "NOISE_CHUNK_NUMEL", 25)  # chunks: [w1 (20), b1 (4)], [w2 (8), b2 (2)]
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2))
    dp_model, opt, crit, _ = _make_private(
        model, n=2, noise_multiplier=1.0, max_grad_norm=0.5, noise_generator=torch.Generator().manual_seed(7)
    )
    replay = torch.Generator().manual_seed(7)
    for _ in range(2):
        crit(dp_model(torch.zeros(2, 5)), torch.zeros(2, 2)).backward()
        clipped = [p.grad.clone() for p in model.parameters()]
        opt.pre_step()
        noise = [torch.empty(n).normal_(0.0, 0.5, generator=replay) for n in (24, 10)]
        want = torch.cat(noise)
        got = torch.cat([(p.grad * 2 - c).flatten() for p, c in zip(model.parameters(), clipped)])  # mean over n=2
        torch.testing.assert_close(got, want)
        opt.zero_grad(set_to_none=True)


def test_sharded_mode_in_one_process_is_a_clear_error():
    sharded = [name for name, m in MODES.items() if m.distributed]
    if not sharded:
        pytest.skip("no sharded mode registered")
    with pytest.raises(PrivacyConfigError, match="torchrun"):
        _make_private(nn.Linear(3, 2), mode=sharded[0])


def test_describe_layers_counts_block0_embedder_reuse_and_paths():
    model = TinyDiT()
    x, t, y, _ = make_batch(2, dtype=torch.float32)
    layers = {d["name"]: d for d in describe_layers(model, "bookkeeping", (x, t, y))}
    emb = "model.transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"
    assert layers[emb]["uses"] == 2 and layers[emb]["rows_per_sample"] == 2 and layers[emb]["norm_path"] == "gram"
    assert layers["model.transformer_blocks.1.norm1.emb.timestep_embedder.linear_1"]["uses"] == 1
    assert layers["model.transformer_blocks.1.norm1.linear"]["norm_path"] == "outer"
    assert layers["model.transformer_blocks.0.attn1.to_q"]["rows_per_sample"] == 4  # (4/2)² patches
    assert layers["model.pos_embed.proj"]["norm_path"] == "conv"
    assert sum(d["trainable_params"] for d in layers.values()) == sum(p.numel() for p in model.parameters())


def test_bf16_autocast_bookkeeping_caches_low_precision_and_matches_two_pass():
    """Under autocast BK caches the bf16 inputs autograd saves, norms accumulate in fp32, and the update agrees
    with the two-pass mode to bf16 precision."""
    base = TinyDiT()
    x, t, y, target = make_batch(4, dtype=torch.float32)
    updates, cached = {}, {}
    for mode in ("ghost", "bookkeeping"):
        model = TinyDiT()
        model.load_state_dict(base.state_dict())
        dp_model, opt, crit, _ = _make_private(model, mode=mode, max_grad_norm=0.05)
        before = [p.detach().clone() for p in model.parameters()]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = crit(dp_model(x, t, y), target)
        qkv = next(s for s in dp_model._states if s.name.endswith("attn1.to_q"))
        cached[mode] = qkv.uses[0].inputs[0].dtype
        coef = dp_model.record_norms(loss.loss_per_sample, retain_graph=mode == "ghost")
        assert dp_model._sq_norm.dtype == torch.float32 and coef.dtype == torch.float32
        if mode == "ghost":  # the second pass, by hand: flagged as the engine's own (else refused as unclipped)
            dp_model._in_backward = True
            (coef * loss.loss_per_sample).sum().backward()
            dp_model._in_backward = False
        else:
            dp_model.write_clipped_grads(coef)
        dp_model.end_step()
        opt.step()
        updates[mode] = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert cached["bookkeeping"] == torch.bfloat16
    rel = (updates["bookkeeping"] - updates["ghost"]).norm() / updates["ghost"].norm()
    assert 0 < rel < 2e-2


def test_qkv_share_one_input_group_and_one_autocast_cast():
    model = TinyDiT()
    dp_model, _, crit, _ = _make_private(model)
    calls = []
    multi = dp_model.norm_backend.multi_linear_sq_norms
    dp_model.norm_backend.multi_linear_sq_norms = lambda A, Gs, **kw: calls.append(len(Gs)) or multi(A, Gs, **kw)
    x, t, y, target = make_batch(4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(dp_model(x, t, y), target)
    by_name = {s.name: s for s in dp_model._states}
    qkv = [by_name[f"model.transformer_blocks.0.attn1.to_{c}"].uses[0].inputs[0] for c in "qkv"]
    assert len({a.untyped_storage().data_ptr() for a in qkv}) == 1  # one bf16 copy for the three layers
    loss.backward()
    assert calls.count(3) == 2  # q/k/v of each of the 2 blocks
    assert 0 < dp_model.dp_cache_peak_bytes


def test_two_pass_frees_output_gradients_before_the_second_backward():
    """The retained graph's taps must not keep the first pass's output gradients alive."""
    import gc
    import weakref

    dp_model, _, crit, _ = _make_private(TinyDiT(), mode="ghost")
    refs = []
    on_grad = dp_model._on_grad_output
    dp_model._on_grad_output = lambda state, use, grad: refs.append(weakref.ref(grad)) or on_grad(state, use, grad)
    x, t, y, target = make_batch(4, dtype=torch.float32)
    loss = crit(dp_model(x, t, y), target)
    dp_model.record_norms(loss.loss_per_sample, retain_graph=True)
    gc.collect()
    assert refs and all(r() is None for r in refs)


def test_single_process_mode_under_several_processes_is_a_clear_error(monkeypatch):
    """Each rank would clip and noise its own samples with no synchronisation: refuse, name the sharded modes."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(PrivacyConfigError, match="single-process but torch.distributed runs 2 processes.*fsdp"):
        _make_private(nn.Linear(3, 2), mode="bookkeeping")
