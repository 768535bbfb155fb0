"""Post-backward programs (``memory_test.privacy.post_programs``): each repeated block's norms and clipped gradients
as one compiled call, exactly the eager engine's update, with the eager engine's clipping margins.

aot_eager throughout (Dynamo and AOTAutograd trace what Inductor would get); the Inductor run of the programs
is ``tests/privacy/test_compile_privacy.py::test_inductor_flash_clip_bk_matches_reference``. The Triton kernels,
entering the programs as custom operators, run in a child process under TRITON_INTERPRET=1 (last test).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memory_test.kernels import flash_norms
from memory_test.privacy import PrivacyEngine, post_programs
from memory_test.privacy.layer_rules import LINEAR_RULE
from memory_test.profiling.compile_stats import compile_stats
from tests.conftest import TinyDiT, make_batch, per_sample_criterion, reference_update, rel_err

AOT = {"backend": "aot_eager", "fullgraph": True}
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
kernel_only = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child (last test)")
N, K = 4, 2


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _private(model, mode, max_grad_norm, criterion, n=N, reduction="mean"):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dp_model, _, crit, _ = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(torch.zeros(n)), batch_size=n),
        criterion=criterion, noise_multiplier=0.0, max_grad_norm=max_grad_norm, grad_sample_mode=mode,
        poisson_sampling=False, loss_reduction=reduction,
    )  # fmt: skip
    return dp_model, crit


def _grads(dp_model, crit, args, target) -> list[torch.Tensor]:
    crit(dp_model(*args), target).backward()
    params = list(dp_model._module.parameters())
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def _margins(dp_model) -> dict:
    """The margin report without the call counts (programs norm layer by layer where eager stacks layers)."""
    report = copy.deepcopy(dp_model.norm_error_margin)
    for entry in report["by_path"].values():
        entry.pop("calls")
    return report


# ----- DiT: every mode, the reference, the eager engine's margins and norm paths ------------------------------
@pytest.mark.parametrize("mode", ["bookkeeping", "flash_clip_bk", "ghost", "flash_clip"])
def test_programs_match_the_reference_and_the_eager_margins(mode):
    model = TinyDiT(num_layers=3).double().train()
    batch = make_batch(N, k=K)
    _, norms = reference_update(model, batch, N, K, 1e9, "mean")
    bound = norms.median().item()
    want, _ = reference_update(model, batch, N, K, bound, "mean")
    eager, eager_crit = _private(copy.deepcopy(model), mode, bound, per_sample_criterion(K, "mean"))
    _grads(eager, eager_crit, batch[:3], batch[3])
    dp_model, crit = _private(copy.deepcopy(model), mode, bound, per_sample_criterion(K, "mean"))
    dp_model.compile(regional=True, **AOT)
    first = compile_stats()
    for _ in range(3):  # the eager shape pass (programs record), the compiling step, a compiled step
        got = _grads(dp_model, crit, batch[:3], batch[3])
        assert rel_err([g / N for g in got], want) <= 1e-6
        assert dp_model.norm_paths == eager.norm_paths
        assert _margins(dp_model) == _margins(eager)
    assert dp_model.post_programs_status == "compiled"
    assert compile_stats().since(first).graph_breaks == 0
    in_programs = {s.name for s in dp_model._states if id(s) in dp_model._programs.states}
    blocks = "model.transformer_blocks"
    assert {f"{blocks}.2.attn1.to_q", f"{blocks}.0.norm1.emb.class_embedder.embedding_table"} <= in_programs
    assert "model.proj_out_2" not in in_programs  # outside the repeated blocks: eager


def test_blocks_of_one_structure_share_one_norms_call_within_the_byte_budget(monkeypatch):
    """Blocks 1-3 have one structure: their samples are stacked into one norms call (block 0 differs: its embedder
    runs twice). With no budget every block has its own call; the update is the reference's either way."""
    model = TinyDiT(num_layers=4).double().train()
    batch = make_batch(N, k=K)
    want, _ = reference_update(model, batch, N, K, 0.5, "mean")
    seen, stack_runs = [], post_programs.stack_runs

    def spy(steps, keys, n):
        runs = stack_runs(steps, keys, n)
        seen.append([len(run) for run in runs])
        return runs

    monkeypatch.setattr(post_programs, "stack_runs", spy)
    for budget, runs in ((post_programs.PROGRAM_STACK_BYTES, [1, 3]), (0, [1, 1, 1, 1])):
        monkeypatch.setattr(post_programs, "PROGRAM_STACK_BYTES", budget)
        torch._dynamo.reset()
        seen.clear()
        dp_model, crit = _private(copy.deepcopy(model), "flash_clip_bk", 0.5, per_sample_criterion(K, "mean"))
        dp_model.compile(regional=True, **AOT)
        for _ in range(3):
            assert rel_err([g / N for g in _grads(dp_model, crit, batch[:3], batch[3])], want) <= 1e-6
        assert seen == [runs] * 3 and dp_model.post_programs_status == "compiled"


def test_a_block_with_a_frozen_weight_is_normed_on_its_own(monkeypatch):
    """Block 2's q weight frozen: its structure and shapes equal blocks 1 and 3's, but a stacked call would norm it
    with block 1's trainable flags (a frozen weight counted, or a trainable one missed): no stacking across it."""
    model = TinyDiT(num_layers=4).double().train()
    frozen = [p for name, p in model.named_parameters() if name.endswith("transformer_blocks.2.attn1.to_q.weight")]
    assert len(frozen) == 1
    frozen[0].requires_grad_(False)
    batch = make_batch(N, k=K)
    want, _ = reference_update(model, batch, N, K, 0.5, "mean")
    seen, stack_runs = [], post_programs.stack_runs
    monkeypatch.setattr(post_programs, "stack_runs", lambda *a: seen.append(stack_runs(*a)) or seen[-1])
    dp_model, crit = _private(copy.deepcopy(model), "flash_clip_bk", 0.5, per_sample_criterion(K, "mean"))
    dp_model.compile(regional=True, **AOT)
    trainable = [p for p in dp_model._module.parameters() if p.requires_grad]
    for _ in range(3):
        crit(dp_model(*batch[:3]), batch[3]).backward()
        assert rel_err([p.grad / N for p in trainable], want) <= 1e-6
        for p in trainable:
            p.grad = None
    assert seen == [[[0], [1], [2], [3]]] * 3


def test_bf16_margins_are_replayed_and_a_switch_change_records_them_anew(monkeypatch):
    """Under bf16 autocast the clip factor carries bf16 slack from the ledger; the compiled steps must report (and
    clip with) the same. Margins switched off midway: the programs recompile and record again."""
    model = TinyDiT(num_layers=2).float().train()
    x, t, y, target = (v.float() if v.is_floating_point() else v for v in make_batch(N, k=K))
    runs = {}
    for compiled in (False, True):
        dp_model, crit = _private(copy.deepcopy(model), "flash_clip_bk", 0.5, per_sample_criterion(K, "mean"))
        if compiled:
            dp_model.compile(regional=True, **AOT)
        steps = []
        for margins in ("1", "1", "1", "0", "0", "1"):
            monkeypatch.setenv("MEMORY_TEST_NORM_MARGINS", margins)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                grads = _grads(dp_model, crit, (x, t, y), target)
            steps.append((grads, _margins(dp_model)))
        runs[compiled] = steps
        assert not compiled or dp_model.post_programs_status == "compiled"
    for (eager_grads, eager_margins), (grads, margins) in zip(runs[False], runs[True]):
        assert margins == eager_margins
        assert rel_err(grads, eager_grads) <= 1e-6
    assert runs[True][0][1]["coefficient_slack"] > 0 and runs[True][3][1]["clip_factor"] == 1.0


def test_programs_off_and_a_failed_compile_stay_exact(monkeypatch):
    model = TinyDiT(num_layers=2).double().train()
    batch = make_batch(N, k=K)
    want, _ = reference_update(model, batch, N, K, 0.5, "mean")
    dp_model, crit = _private(copy.deepcopy(model), "bookkeeping", 0.5, per_sample_criterion(K, "mean"))
    dp_model.compile(regional=True, programs=False, **AOT)
    for _ in range(2):
        assert rel_err([g / N for g in _grads(dp_model, crit, batch[:3], batch[3])], want) <= 1e-6
    assert dp_model.post_programs_status == "off"

    def untraceable(module, uses, n, backend):  # eager: a no-op break; traced: Dynamo refuses it (fullgraph)
        torch._dynamo.graph_break()
        return type(LINEAR_RULE).sq_norm(LINEAR_RULE, module, uses, n, backend)

    monkeypatch.setattr(LINEAR_RULE, "sq_norm", untraceable, raising=False)
    dp_model, crit = _private(copy.deepcopy(model), "bookkeeping", 0.5, per_sample_criterion(K, "mean"))
    dp_model.compile(regional=True, **AOT)
    with pytest.warns(UserWarning, match="post-backward programs run eagerly"):
        for _ in range(3):
            assert rel_err([g / N for g in _grads(dp_model, crit, batch[:3], batch[3])], want) <= 1e-6
    assert dp_model.post_programs_status.startswith("eager: ")


# ----- other layer types inside repeated blocks ----------------------------------------------------------------
class Block(nn.Module):
    """Conv1d, GroupNorm, LayerNorm, RMSNorm (all affine) and a Linear used twice, on (N, C, L)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv = nn.Conv1d(c, c, 3, padding=1, padding_mode="reflect")
        self.group = nn.GroupNorm(2, c)
        self.layer = nn.LayerNorm(c)
        self.rms = nn.RMSNorm(c)
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        h = self.group(self.conv(x)).transpose(1, 2)
        h = self.lin(torch.tanh(self.lin(self.rms(self.layer(h)))))  # lin twice: cross terms between uses
        return x + h.transpose(1, 2)


class BlockNet(nn.Module):
    def __init__(self, c: int = 4, length: int = 5, classes: int = 6):
        super().__init__()
        self.embed = nn.Embedding(classes, c * length)
        self.blocks = nn.ModuleList(Block(c) for _ in range(3))
        self.head = nn.Linear(c, 2)
        self.shape = (c, length)

    def forward(self, y):
        x = self.embed(y).view(-1, *self.shape)
        for block in self.blocks:
            x = block(x)
        return self.head(x.transpose(1, 2))


@pytest.mark.parametrize("mode", ["bookkeeping", "flash_clip"])
def test_conv_norm_and_reused_layers_in_programs_match_the_eager_engine(mode):
    torch.manual_seed(0)
    model = BlockNet().double()
    y = torch.randint(0, 6, (5,))
    target = torch.randn(5, 5, 2, dtype=torch.float64)

    def criterion(pred, tgt):
        return (pred - tgt).pow(2).flatten(1).mean(1)

    criterion.reduction = "sum"
    eager, eager_crit = _private(copy.deepcopy(model), mode, 0.3, criterion, n=5, reduction="sum")
    want = _grads(eager, eager_crit, (y,), target)
    dp_model, crit = _private(copy.deepcopy(model), mode, 0.3, criterion, n=5, reduction="sum")
    dp_model.compile(**AOT)  # the whole model: programs still go block by block
    for _ in range(3):
        assert rel_err(_grads(dp_model, crit, (y,), target), want) <= 1e-10
    in_programs = {s.name for s in dp_model._states if id(s) in dp_model._programs.states}
    assert in_programs == {
        f"blocks.{b}.{layer}" for b in range(3) for layer in ("conv", "group", "layer", "rms", "lin")
    }
    assert dp_model.post_programs_status == "compiled"


# ----- the Triton kernels as operators (TRITON_INTERPRET=1 child) ------------------------------------------------
@kernel_only
@pytest.mark.parametrize("path", ["gram", "direct"])
def test_kernel_operators_in_programs_match_the_eager_engine(path, monkeypatch):
    if path == "direct":  # every T > 1 layer on the direct kernel
        monkeypatch.setitem(flash_norms.GRAM_ADVANTAGE, torch.float32, 1e-3)
    model = TinyDiT(num_layers=2).float().train()
    x, t, y, target = (v.float() if v.is_floating_point() else v for v in make_batch(N, k=K))
    eager, eager_crit = _private(copy.deepcopy(model), "flash_clip_bk", 0.5, per_sample_criterion(K, "mean"))
    want = _grads(eager, eager_crit, (x, t, y), target)
    ops = set()

    def recording_backend(gm, example_inputs):
        ops.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    dp_model, crit = _private(copy.deepcopy(model), "flash_clip_bk", 0.5, per_sample_criterion(K, "mean"))
    dp_model.compile(regional=True, backend=recording_backend, fullgraph=True)
    for _ in range(3):
        assert rel_err(_grads(dp_model, crit, (x, t, y), target), want) <= 1e-6
    assert dp_model.post_programs_status == "compiled"
    assert f"memory_test.flash_{path}_norms.default" in ops
    assert set(dp_model.norm_paths.values()) == set(eager.norm_paths.values()) >= {path, "embedding"}


def test_programs_under_the_triton_interpreter():
    """Runs this file's kernel tests in a child with TRITON_INTERPRET=1 (it must be set before triton loads)."""
    if IN_INTERPRETER:
        pytest.skip("already the child")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", __file__]
    proc = subprocess.run(
        [*child, "-k", "kernel_operators"], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
