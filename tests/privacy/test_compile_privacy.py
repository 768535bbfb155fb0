"""DP modes under torch.compile (``dp_model.compile``): every step's update equals the float64 reference (CPU).

Most tests compile with ``backend="aot_eager"``: Dynamo and AOTAutograd trace exactly what Inductor would get (the
sinks, the replayed input lists, the detached or retained backward), without Inductor's own float64 numerics, so the
bound stays the eager engine's 1e-6. One test runs Inductor itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from memory_test.privacy import MODES, PrivacyConfigError, PrivacyEngine
from memory_test.privacy.compile_options import uses_cuda_graphs, without_cuda_graphs
from memory_test.privacy.compiled import CompiledDPGradSampleModule, compile_private, repeated_blocks
from memory_test.privacy.fsdp import FSDPDPGradSampleModule
from memory_test.profiling.compile_stats import compile_stats
from tests.conftest import TinyDiT, make_batch, make_private, per_sample_criterion, reference_update, rel_err

SINGLE_PROCESS_MODES = sorted(name for name, m in MODES.items() if not m.distributed)
AOT = {"backend": "aot_eager", "fullgraph": True}
ROWS = (5, 0, 5, 5)
QKV_OF_BLOCK_1 = tuple(f"transformer_blocks.1.attn1.to_{x}" for x in "qkv")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # every test compiles its own graphs (and proves it by counting them)
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny_model():
    return TinyDiT().double().train()


def _private(model, mode, k, max_grad_norm, n=4, reduction="mean", prepare=None):
    model = copy.deepcopy(model)
    if prepare is not None:
        prepare(model)
    dp_model, dp_opt, crit, _ = make_private(
        model, mode, per_sample_criterion(k, reduction), n, max_grad_norm=max_grad_norm, loss_reduction=reduction
    )
    return dp_model, dp_opt, crit


def _step_update(dp_model, crit, batch, n, reduction="mean") -> list[torch.Tensor]:
    """The clipped sum of one step (divided by n for 'mean'), read from p.grad and cleared."""
    x, t, y, target = batch
    crit(dp_model(x, t, y), target).backward()
    params = list(dp_model._module.parameters())
    update = [p.grad / n if reduction == "mean" else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return update


def _clipping_bound(model, batch, n, k) -> float:
    _, norms = reference_update(model, batch, n, k, 1e9, "mean")
    bound = norms.median().item()  # some samples clipped, some not
    assert (norms > bound * 1.01).any() and (norms < bound * 0.99).any()
    return bound


@pytest.mark.parametrize("mode", SINGLE_PROCESS_MODES)
@pytest.mark.parametrize("k", [1, 3])
def test_compiled_steps_match_reference(tiny_model, mode, k):
    n = 4
    batch = make_batch(n, k=k)
    bound = _clipping_bound(tiny_model, batch, n, k)
    want, _ = reference_update(tiny_model, batch, n, k, bound, "mean")
    eager_model, _, eager_crit = _private(tiny_model, mode, k, bound)
    assert rel_err(_step_update(eager_model, eager_crit, batch, n), want) <= 1e-6
    dp_model, _, crit = _private(tiny_model, mode, k, bound)
    dp_model.compile(regional=True, **AOT)
    assert isinstance(dp_model, CompiledDPGradSampleModule)
    first = compile_stats()
    assert rel_err(_step_update(dp_model, crit, batch, n), want) <= 1e-6  # the eager pass that learns the shapes
    assert compile_stats().since(first).graphs == 0
    for _ in range(2):
        assert rel_err(_step_update(dp_model, crit, batch, n), want) <= 1e-6
    done = compile_stats().since(first)
    # Block 0's input has other strides than the later blocks' (it comes from the patch embedding): two graphs.
    # Programs (norms; book-keeping: clipped gradients too) have two structures: block 0's embedder runs twice.
    programs = 2 * (2 if MODES[mode].strategy == "bookkeeping" else 1)
    assert dp_model.post_programs_status == "compiled"
    assert done.graph_breaks == 0 and 1 + programs <= done.graphs <= 2 + programs, done
    assert done.recompiles <= 1 + programs // 2, done
    if MODES[mode].strategy == "bookkeeping":
        assert dp_model.dp_cache_peak_bytes == eager_model.dp_cache_peak_bytes
    else:  # the compiled backward hands over every output gradient at once, the eager taps one layer at a time
        assert dp_model.dp_cache_peak_bytes > eager_model.dp_cache_peak_bytes
    assert dp_model.norm_paths == eager_model.norm_paths


def test_whole_model_compile_matches_reference(tiny_model):
    n, k = 4, 2
    batch = make_batch(n, k=k)
    bound = _clipping_bound(tiny_model, batch, n, k)
    want, _ = reference_update(tiny_model, batch, n, k, bound, "mean")
    dp_model, _, crit = _private(tiny_model, "bookkeeping", k, bound)
    dp_model.compile(**AOT)
    first = compile_stats()
    for _ in range(3):
        assert rel_err(_step_update(dp_model, crit, batch, n), want) <= 1e-6
    assert compile_stats().since(first).graphs == 1 + 4  # the model; norms and clipped gradients x 2 structures


def test_poisson_batch_sizes_compile_a_bounded_number_of_times(tiny_model):
    """Sizes vary from step to step: after the second size the batch dimension is dynamic (sinks included)."""
    k, bound = 2, 0.5
    model = TinyDiT(num_layers=3).double().train()  # blocks 1 and 2 must share one graph
    dp_model, _, crit = _private(model, "flash_clip_bk", k, bound, reduction="sum")
    dp_model.compile(regional=True, **AOT)
    first = compile_stats()
    for seed, n in enumerate([4, 4, 3, 5, 2]):
        batch = make_batch(n, k=k, seed=seed)
        want, _ = reference_update(model, batch, n, k, bound, "sum")
        assert rel_err(_step_update(dp_model, crit, batch, n, "sum"), want) <= 1e-6, n
    done = compile_stats().since(first)
    # (static, dynamic) x (block 0, later blocks), for the blocks and for each of the two programs
    assert done.graph_breaks == 0 and done.graphs <= 4 * 3, done


def test_inductor_flash_clip_bk_matches_reference(tiny_model):
    """Inductor's float64 numerics differ from eager's by ~4e-6 on this model even without DP (it computes the
    float32 timestep embedding's sin/cos with its own kernels), hence the looser bound here."""
    n, k = 4, 3
    batch = make_batch(n, k=k)
    bound = _clipping_bound(tiny_model, batch, n, k)
    want, _ = reference_update(tiny_model, batch, n, k, bound, "mean")
    dp_model, _, crit = _private(tiny_model, "flash_clip_bk", k, bound)
    dp_model.compile(fullgraph=True)
    first = compile_stats()
    for _ in range(3):
        assert rel_err(_step_update(dp_model, crit, batch, n), want) <= 2e-5
    done = compile_stats().since(first)
    assert done.graph_breaks == 0 and done.graphs == 1 + 4, done  # the model, 2 programs x 2 block structures
    assert dp_model.post_programs_status == "compiled"


@pytest.mark.parametrize("how", ["torch.compile(dp_model)", "model.compile() before make_private"])
def test_compiling_the_eager_engine_stays_exact(how):
    """Compiling around the eager taps (not dp_model.compile()): a graph break at every tap, still the reference.

    Without the breaks Dynamo traced each tap's backward once, as an identity, and the norms missed every layer.
    """
    n, k = 4, 1
    model = TinyDiT(num_layers=1).double().train()
    batch = make_batch(n, k=k)
    bound = _clipping_bound(model, batch, n, k)
    want, _ = reference_update(model, batch, n, k, bound, "mean")
    prepare = (lambda m: m.compile(backend="aot_eager")) if how == "model.compile() before make_private" else None
    dp_model, _, crit = _private(model, "flash_clip", k, bound, prepare=prepare)
    first = compile_stats()
    if how == "torch.compile(dp_model)":
        dp_model = torch.compile(dp_model, backend="aot_eager")
    assert rel_err(_step_update(dp_model, crit, batch, n), want) <= 1e-6
    assert compile_stats().since(first).graph_breaks > 0


def test_torch_compile_after_dp_compile_keeps_the_dp_forward_eager(tiny_model):
    n, k = 4, 1
    batch = make_batch(n, k=k)
    bound = _clipping_bound(tiny_model, batch, n, k)
    want, _ = reference_update(tiny_model, batch, n, k, bound, "mean")
    dp_model, _, crit = _private(tiny_model, "flash_clip_bk", k, bound)
    dp_model.compile(regional=True, **AOT)
    wrapped = torch.compile(dp_model, backend="aot_eager")
    for _ in range(2):
        assert rel_err(_step_update(wrapped, crit, batch, n), want) <= 1e-6


def test_bf16_autocast_compiled_matches_eager_engine(tiny_model):
    n, k = 4, 2
    model = copy.deepcopy(tiny_model).float()
    x, t, y, target = (v.float() if v.is_floating_point() else v for v in make_batch(n, k=k))
    updates = []
    for compiled in (False, True):
        dp_model, _, crit = _private(model, "flash_clip_bk", k, 0.5)
        if compiled:
            dp_model.compile(regional=True, **AOT)
        for _ in range(1 + compiled):  # the compiled model's second step runs the graphs
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = crit(dp_model(x, t, y), target)
            taps = getattr(dp_model, "_taps", [])
            qkv = {id(use.inputs[0]) for state, use, _ in taps if state.name.endswith(QKV_OF_BLOCK_1)}
            loss.backward()
            updates.append([p.grad / n for p in dp_model._module.parameters()])
            dp_model.zero_grad(set_to_none=True)
    # q, k and v of a compiled block get one bf16 copy of their input (one cached A, one input Gram for the three)
    assert len(qkv) == 1
    assert rel_err(updates[-1], updates[0]) <= 1e-6


@pytest.mark.parametrize("mode", ["ghost", "flash_clip_bk"])
def test_any_model_compiles_whole_and_an_empty_batch_records_nothing(mode):
    """Not only DiTs: an MLP with a reused layer, compiled whole; an empty batch in between changes nothing."""
    torch.manual_seed(0)
    lin, out = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin, out).double()  # lin used twice: cross terms
    x = torch.randn(5, 3, dtype=torch.float64)
    target = torch.randn(5, 1, dtype=torch.float64)

    def criterion(pred, y):
        return (pred - y).pow(2).flatten(1).mean(1)

    criterion.reduction = "sum"
    updates = []
    for compiled in (False, True):
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        dp_model, _, crit, _ = PrivacyEngine().make_private(
            module=net, optimizer=opt, data_loader=DataLoader(TensorDataset(torch.zeros(5)), batch_size=5),
            criterion=criterion, noise_multiplier=0.0, max_grad_norm=0.3, grad_sample_mode=mode,
            poisson_sampling=False, loss_reduction="sum",
        )  # fmt: skip
        if compiled:
            dp_model.compile(**AOT)
        for rows in ROWS:
            crit(dp_model(x[:rows]), target[:rows]).backward()
            grads = [p.grad.clone() for p in net.parameters()]
            opt.zero_grad(set_to_none=True)
            if rows == 0:
                assert all(g.abs().sum() == 0 for g in grads)
        updates.append(grads)
    assert rel_err(updates[1], updates[0]) <= 1e-12


def test_sharded_modes_refuse_to_compile():
    gsm = FSDPDPGradSampleModule.__new__(FSDPDPGradSampleModule)  # refused before any state is read
    with pytest.raises(PrivacyConfigError, match="cannot be compiled yet"):
        compile_private(gsm)


@pytest.mark.parametrize("mode", [m for m, spec in MODES.items() if spec.strategy == "two_pass"])
@pytest.mark.parametrize("kwargs", [{"mode": "reduce-overhead"}, {"options": {"triton.cudagraphs": True}}])
def test_two_pass_modes_refuse_cuda_graphs(tiny_model, mode, kwargs):
    dp_model, *_ = _private(tiny_model, mode, 1, 1.0)
    with pytest.raises(PrivacyConfigError, match="two-pass mode"):
        dp_model.compile(regional=True, **kwargs)


def test_book_keeping_under_reduce_overhead_stays_exact(tiny_model, monkeypatch):
    """On the CPU Inductor runs no CUDA graph (they need CUDA tensors), but the path is the one a GPU takes: every
    recorded forward after the shape pass starts a new CUDA-graph step, the norms program is compiled with the
    mode and the clipped-gradients program without it (its outputs become p.grad). One mode: Inductor's CPU
    compile is the cost of this test, and bookkeeping differs from flash_clip_bk only in its norm backend."""
    mode = "flash_clip_bk"
    n, k = 4, 1
    batch = make_batch(n, k=k)
    bound = _clipping_bound(tiny_model, batch, n, k)
    want, _ = reference_update(tiny_model, batch, n, k, bound, "mean")
    steps_begun = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps_begun.append(1))
    dp_model, _, crit = _private(tiny_model, mode, k, bound)
    dp_model.compile(regional=True, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        assert rel_err(_step_update(dp_model, crit, batch, n), want) <= 1e-5
    assert len(steps_begun) == 2  # not in the eager shape pass
    assert dp_model.post_programs_status == "compiled"


def test_compile_options_say_where_cuda_graphs_are_on():
    assert uses_cuda_graphs({"mode": "reduce-overhead"}) and uses_cuda_graphs({"options": {"triton.cudagraphs": 1}})
    assert not uses_cuda_graphs({"mode": "max-autotune"}) and not uses_cuda_graphs({})
    off = without_cuda_graphs({"mode": "reduce-overhead", "options": {"triton.cudagraphs": True, "x": 1}})
    assert off == {"options": {"triton.cudagraphs": False, "x": 1}} and not uses_cuda_graphs(off)
    assert without_cuda_graphs({"mode": "max-autotune"}) == {"mode": "max-autotune"}


def test_repeated_blocks_of_a_dit():
    blocks = repeated_blocks(TinyDiT(num_layers=3))
    assert len(blocks) == 3 and {type(b).__name__ for b in blocks} == {"BasicTransformerBlock"}
