"""flash_clip and flash_clip_bk through the Triton kernels (TRITON_INTERPRET=1 on CPU) against the fp64 reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import TinyDiT, make_batch, reference_update, rel_err
from tests.conftest import dp_update as _dp_update

N = 4

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
kernel_only = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child (last test)")


@kernel_only
@pytest.mark.parametrize("mode", ["flash_clip", "flash_clip_bk"])
def test_kernel_path_update_matches_float64_reference(mode):
    model64 = TinyDiT().double().train()
    batch64 = make_batch(N, k=2)
    _, norms = reference_update(model64, batch64, N, 2, 1e9, "mean")
    max_grad_norm = norms.median().item()
    want, _ = reference_update(model64, batch64, N, 2, max_grad_norm, "mean")
    model32 = TinyDiT().float().train()
    batch32 = tuple(x.float() if x.is_floating_point() else x for x in batch64)
    got = _dp_update(model32, batch32, 2, max_grad_norm, mode, "mean")
    assert rel_err([g.double() for g in got], want) <= 1e-4


@kernel_only
def test_kernel_backend_and_paths_are_recorded():
    from tests.conftest import make_private as _make_private

    dp_model, _, crit, _ = _make_private(TinyDiT(), mode="flash_bk")
    x, t, y, target = make_batch(4, dtype=torch.float32)
    crit(dp_model(x, t, y), target).backward()
    assert dp_model.kernel_backend() == "triton"
    paths = set(dp_model.norm_paths.values())
    assert {"gram", "outer", "embedding"} <= paths


def test_flash_modes_under_the_triton_interpreter():
    """Runs this file's kernel tests in a child with TRITON_INTERPRET=1 (it must be set before triton loads)."""
    if IN_INTERPRETER:
        pytest.skip("already the child")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.skipif(IN_INTERPRETER, reason="plain torch: runs in the parent")
@pytest.mark.parametrize("path", ["gram", "direct"])
def test_reference_norms_chunked_equal_one_chunk(monkeypatch, path):
    """The torch reference's chunked loop (large batches) and its one-chunk fast path give the same norms."""
    from memory_test.kernels import flash_norms_reference as ref

    torch.manual_seed(0)
    A, G = torch.randn(5, 7, 6, dtype=torch.float64), torch.randn(5, 7, 3, dtype=torch.float64)
    whole = ref.linear_sq_norms_reference(A, G, with_bias=True, path=path)
    monkeypatch.setattr(ref, "_CHUNK_BYTES", 1)  # one sample per chunk
    chunked = ref.linear_sq_norms_reference(A, G, with_bias=True, path=path)
    want_w, want_b = ref.per_sample_gradient_sq_norms(A, G)
    for got in (whole, chunked):
        torch.testing.assert_close(got[0], want_w)
        torch.testing.assert_close(got[1], want_b)
