"""The DiT wrapper under torch.compile: one graph, no breaks, same numbers, attention kernel still recorded (CPU)."""

from __future__ import annotations

import pytest
import torch

from memory_test.models.dit_huggingface_wrapper import DiTHuggingFaceWrapper
from memory_test.profiling.compile_stats import compile_stats
from tests.models.dit_tiny_batches import NUM_CLASSES, batch


def tiny(dtype=torch.float32, **kw) -> DiTHuggingFaceWrapper:
    torch.manual_seed(0)
    return DiTHuggingFaceWrapper("DiT-tiny", num_classes=NUM_CLASSES, class_dropout_prob=0.0, **kw).to(dtype)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("flash, kernel", [(True, "flash"), (False, "math")])
def test_wrapper_traces_as_one_graph(flash, kernel):
    w = tiny(torch.float64, use_flash_attention=flash)
    x, t, y, _ = batch(3, torch.float64)
    explained = torch._dynamo.explain(w)(x, t, y)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    assert w.attention_processor.compiled_kernels == {kernel} and not w.attention_processor.calls
    compiled = torch.compile(w, fullgraph=True, backend="aot_eager")
    out = compiled(x, t, y)
    (grad_c,) = torch.autograd.grad(out.square().sum(), [w.model.proj_out_2.weight])
    assert not w.attention_processor.calls  # compiled calls are recorded as compiled, never counted
    ref = w(x, t, y)
    (grad_e,) = torch.autograd.grad(ref.square().sum(), [w.model.proj_out_2.weight])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-12, atol=1e-12)
    assert w.attention_backend == kernel and w.attention_processor.calls[kernel] == len(w.model.transformer_blocks)


def test_wrapper_inductor_fullgraph_matches_eager_without_recompiling():
    w = tiny()
    compiled = torch.compile(w, fullgraph=True)
    before = compile_stats()
    outs, grads = [], []
    for seed in (0, 1):  # the second step must reuse the first step's graph
        x, t, y, eps = batch(4, seed=seed)
        pred, loss = compiled(x, t, y, eps)
        grads.append(torch.autograd.grad(loss.sum(), list(w.parameters())))
        outs.append(pred.detach())
    done = compile_stats().since(before)
    assert done.graph_breaks == 0 and done.graphs == 1 and done.recompiles == 0, done
    assert w.attention_backend == "flash" and not w.attention_processor.calls
    for seed, out, grad in zip((0, 1), outs, grads):
        x, t, y, eps = batch(4, seed=seed)
        pred, loss = w(x, t, y, eps)
        torch.testing.assert_close(out, pred, rtol=1e-5, atol=1e-5)
        for g, g_ref in zip(grad, torch.autograd.grad(loss.sum(), list(w.parameters()))):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
