"""Flash per-sample Linear norms: Triton kernels (CUDA, or the CPU interpreter) vs the float64 torch reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from memory_test.kernels import flash_norms as fn
from memory_test.kernels import norm_error
from memory_test.kernels.flash_norms_reference import (
    linear_sq_norms_reference,
    opacus_einsum_sq_norms,
    per_sample_gradient_sq_norms,
)

ROOT = Path(__file__).resolve().parents[2]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton decides at decoration time whether a kernel is interpreted, so on a CPU-only machine the kernel tests
# run in a child process started with TRITON_INTERPRET=1 (see the last test) and are skipped in this one.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
kernel_test = pytest.mark.skipif(KERNEL_DEVICE is None, reason="kernels run in the TRITON_INTERPRET=1 subprocess")
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
# (B, T, d, p): T=1, T not a multiple of any tile, d or p = 3, B = 1.
SHAPES = [(1, 37, 3, 20), (3, 2, 17, 5), (2, 1, 9, 4), (2, 19, 33, 3)]


def _pair(B, T, d, p, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, T, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    G = torch.randn(B, T, p, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return A, G


def _check(got, ref, rtol):
    """Relative error per sample, with an absolute floor of rtol x the batch's largest value (cancellation)."""
    got, ref = got.double().cpu(), ref.double().cpu()
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


def _check_result(result, A, G, with_bias, rtol):
    w, b, _ = result
    ref_w, ref_b = linear_sq_norms_reference(A.double(), G.double(), with_bias=True, path="direct")
    assert w.dtype == torch.float32 and w.shape == ref_w.shape
    _check(w, ref_w, rtol)
    if with_bias:
        _check(b, ref_b, rtol)
    else:
        assert b is None


# ---------------------------------------------------------------- reference, path and backend choice (always run)


@pytest.mark.parametrize("shape", SHAPES + [(4, 6, 5, 7)])
def test_reference_gram_direct_and_explicit_gradients_agree(shape):
    A, G = _pair(*shape, dtype=torch.float64)
    w_exp, b_exp = per_sample_gradient_sq_norms(A, G)
    paths = ["gram", "direct"] + (["outer"] if shape[1] == 1 else [])
    for path in paths:
        w, b = linear_sq_norms_reference(A, G, with_bias=True, path=path)
        torch.testing.assert_close(w, w_exp, rtol=1e-12, atol=0)
        torch.testing.assert_close(b, b_exp, rtol=1e-12, atol=0)


def test_opacus_einsum_baseline_matches_opacus_norm_sampler():
    from opacus.grad_sample.linear import compute_linear_norm_sample

    for A, G in [_pair(3, 7, 5, 4, dtype=torch.float64), [x[:, 0] for x in _pair(3, 1, 5, 4, dtype=torch.float64)]]:
        layer = nn.Linear(5, 4).double()
        norms = compute_linear_norm_sample(layer, [A], G)
        w, b = opacus_einsum_sq_norms(A, G, with_bias=True)
        torch.testing.assert_close(w, norms[layer.weight].square(), rtol=1e-12, atol=0)
        torch.testing.assert_close(b, norms[layer.bias].square(), rtol=1e-12, atol=0)
        w_ref, b_ref = linear_sq_norms_reference(A, G, with_bias=True)
        torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=0)


def test_choose_path():
    assert fn.choose_path(1, 1152, 6912) == "outer"
    # bf16: T < 2 d p / (d + p), 1152 for d = p = 1152; fp32: T < 8 d p / (d + p), 4608.
    assert fn.choose_path(1151, 1152, 1152, torch.bfloat16) == "gram"
    assert fn.choose_path(1153, 1152, 1152, torch.bfloat16) == "direct"
    assert fn.choose_path(4096, 4608, 1152, torch.bfloat16) == "direct"
    assert fn.choose_path(4607, 1152, 1152) == "gram"
    assert fn.choose_path(4609, 1152, 1152, torch.float32) == "direct"
    assert fn.choose_path(256, 1152, 4608) == "gram"
    assert fn.choose_path(40, 3, 5) == "direct"


def test_kernel_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert fn.kernel_backend("cpu") == "torch"
    assert fn.kernel_backend(torch.device("cuda")) == "triton"
    assert fn.kernel_backend("cuda", torch.float64) == "torch"
    with pytest.raises(RuntimeError, match="CUDA device or TRITON_INTERPRET"):
        fn.linear_sq_norms(*_pair(2, 3, 4, 5), with_bias=True, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fn.kernel_backend("cpu") == "triton"
    assert fn.kernel_backend("cpu", torch.float64) == "torch"
    with pytest.raises(ValueError, match="float64"):
        fn.linear_sq_norms(*_pair(2, 3, 4, 5, dtype=torch.float64), with_bias=True, backend="triton")


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_backend_is_exact_in_float64(shape):
    A, G = _pair(*shape, dtype=torch.float64)
    w_exp, b_exp = per_sample_gradient_sq_norms(A, G)
    for path in ("auto", "gram", "direct"):
        w, b, used = fn.linear_sq_norms(A, G, with_bias=True, path=path, backend="torch")
        assert used == (fn.choose_path(*shape[1:]) if path == "auto" else path)
        assert w.dtype == torch.float64
        torch.testing.assert_close(w, w_exp, rtol=1e-12, atol=0)
        torch.testing.assert_close(b, b_exp, rtol=1e-12, atol=0)
    outs = fn.multi_linear_sq_norms(A, [G, G[..., :2]], with_bias=[True, False], backend="torch")
    torch.testing.assert_close(outs[0][0], w_exp, rtol=1e-12, atol=0)
    assert outs[1][1] is None


def test_bad_inputs():
    A, G = _pair(2, 3, 4, 5)
    with pytest.raises(ValueError, match="disagree"):
        fn.linear_sq_norms(A, G[:, :2], with_bias=False)
    with pytest.raises(ValueError, match="outer path"):
        fn.linear_sq_norms(A, G, with_bias=False, path="outer")
    with pytest.raises(ValueError, match="unknown path"):
        fn.linear_sq_norms(A, G, with_bias=False, path="ghost")
    with pytest.raises(ValueError, match="with_bias flags"):
        fn.multi_linear_sq_norms(A, [G, G], with_bias=[True])


# ---------------------------------------------------------------- kernels (CUDA, or the interpreter subprocess)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("path", ["gram", "direct"])
def test_kernels_match_float64_reference(dtype, path):
    for i, shape in enumerate(SHAPES):
        A, G = _pair(*shape, dtype=dtype, device=KERNEL_DEVICE, seed=i)
        with_bias = i % 2 == 0
        result = fn.linear_sq_norms(A, G, with_bias=with_bias, path=path, backend="triton", allow_tf32=False)
        assert result[2] == path
        _check_result(result, A, G, with_bias, RTOL[dtype])


@kernel_test
def test_16bit_kernels_close_to_float64_of_unrounded_inputs():
    A, G = _pair(2, 37, 20, 24, dtype=torch.float64, device=KERNEL_DEVICE)
    ref_w, ref_b = linear_sq_norms_reference(A, G, with_bias=True)
    for path in ("gram", "direct"):
        w, b, _ = fn.linear_sq_norms(A.bfloat16(), G.bfloat16(), with_bias=True, path=path, backend="triton")
        _check(w, ref_w, 1e-2)
        _check(b, ref_b, 1e-2)


def _round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest TF32 value (ties away from zero), the same bit operation as the kernels' _round_tf32."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@kernel_test
@pytest.mark.parametrize("path", ["gram", "direct"])
def test_tf32_rounding_feeds_the_dots_round_to_nearest_operands(path, monkeypatch):
    """With FLASH_NORMS_TF32_ROUNDING=1 a TF32 dot sees operands rounded to nearest TF32: its result is the exact
    norm of the rounded operands (products of 11-bit significands are exact in fp32), not a truncated one."""
    A, G = _pair(2, 37, 40, 24, device=KERNEL_DEVICE, seed=5)
    exact_w, exact_b = linear_sq_norms_reference(A.double(), G.double(), with_bias=True)
    Ar, Gr = _round_to_tf32(A).double(), _round_to_tf32(G).double()
    rounded_w, rounded_b = linear_sq_norms_reference(Ar, Gr, with_bias=True)
    assert ((rounded_w - exact_w).abs() / exact_w).max() > 1e-5  # the check below can tell the two apart
    monkeypatch.setenv(fn.TF32_ROUNDING_ENV, "1")
    w, b, _ = fn.linear_sq_norms(A, G, with_bias=True, path=path, backend="triton", allow_tf32=True)
    _check(w, rounded_w.to(w.device), 1e-6)
    # The bias: the Gram path reads it off the (rounded) G Grams; the direct path sums G's rows outside any dot.
    _check(b, (rounded_b if path == "gram" else exact_b).to(b.device), 1e-6)
    monkeypatch.setenv(fn.TF32_ROUNDING_ENV, "0")
    w0, _, _ = fn.linear_sq_norms(A, G, with_bias=True, path=path, backend="triton", allow_tf32=False)
    _check(w0, exact_w.to(w0.device), 1e-5)  # ieee: no rounding at all


def test_tf32_rounding_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv(fn.TF32_ROUNDING_ENV, "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        fn.tf32_rounding()


@kernel_test
def test_auto_path_outer_and_two_dimensional_inputs():
    for shape in [(3, 3, 33, 20), (2, 40, 3, 5), (3, 1, 6, 7)]:
        A, G = _pair(*shape, device=KERNEL_DEVICE)
        result = fn.linear_sq_norms(A, G, with_bias=True, allow_tf32=False)
        assert result[2] == fn.choose_path(*shape[1:])
        _check_result(result, A, G, True, 1e-5)
    A, G = _pair(3, 1, 6, 7, device=KERNEL_DEVICE)
    result = fn.linear_sq_norms(A[:, 0], G[:, 0], with_bias=False)
    assert result[2] == "outer"
    _check_result(result, A, G, False, 1e-5)


@kernel_test
def test_many_tile_pairs_non_contiguous_and_mixed_dtypes():
    # 300 rows = 19 tiles of 16 in the interpreter: 190 tile pairs exercise the triangular index inversion.
    A, G = _pair(2, 300, 5, 6, device=KERNEL_DEVICE)
    for path in ("gram", "direct"):
        _check_result(fn.linear_sq_norms(A, G, with_bias=True, path=path, allow_tf32=False), A, G, True, 1e-5)
    # Feature-strided A (a transposed view), row-strided G, and a batch slice.
    At = A.transpose(1, 2).contiguous().transpose(1, 2)[:, ::3]
    Gs = torch.cat([G, G], dim=1)[:, ::6]
    assert At.stride(-1) != 1 and Gs.stride(1) != Gs.shape[-1]
    for path in ("gram", "direct"):
        _check_result(fn.linear_sq_norms(At[1:], Gs[1:], with_bias=True, path=path, allow_tf32=False),
                      At[1:], Gs[1:], True, 1e-5)  # fmt: skip
    A, G = _pair(2, 21, 7, 9, device=KERNEL_DEVICE)
    for path in ("gram", "direct"):
        result = fn.linear_sq_norms(A, G.bfloat16(), with_bias=True, path=path, allow_tf32=False)
        _check_result(result, A, G.bfloat16(), True, 1e-4)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shared_input_variant(dtype):
    A, _ = _pair(2, 21, 48, 1, dtype=dtype, device=KERNEL_DEVICE)
    # Six gradients: under "auto" five take the Gram path (two launches sharing A: 4 + 1); p = 3 takes the direct
    # path in bf16 (the fp32 crossover is higher).
    Gs = [_pair(2, 21, 1, p, dtype=dtype, device=KERNEL_DEVICE, seed=p)[1] for p in (48, 192, 64, 80, 3, 72)]
    Gs[1] = Gs[1][:, :, ::2]  # non-contiguous features: copied before the launch
    with_bias = [True, False, True, True, False, True]
    for path in ("auto", "gram", "direct"):
        outs = fn.multi_linear_sq_norms(A, Gs, with_bias=with_bias, path=path, allow_tf32=False)
        for G, wb, result in zip(Gs, with_bias, outs):
            assert result[2] == (fn.choose_path(21, 48, G.shape[-1], dtype) if path == "auto" else path)
            _check_result(result, A, G, wb, RTOL[dtype])
    expected = {fn.choose_path(21, 48, G.shape[-1], dtype) for G in Gs}
    assert {r[2] for r in fn.multi_linear_sq_norms(A, Gs, with_bias=with_bias)} == expected


def _formula_on_reference(A, G, budget):
    """What the kernels should return: the float64 norms plus u·D from float64 diagonal sums."""
    w, b = linear_sq_norms_reference(A.double(), G.double(), with_bias=True, path="direct")
    dw, db = norm_error.incoherent_sums(A.double(), G.double())
    return norm_error.incoherent_term(w, budget.u_w, dw), norm_error.incoherent_term(b, budget.u_b, db)


@kernel_test
@pytest.mark.parametrize("path", ["gram", "direct"])
def test_kernel_bounds_are_the_formula_applied_to_their_own_sums(path):
    """With TF32 asked for, the budget is not exact; the interpreter multiplies exactly, so w + u·D must equal the
    float64 norms plus u times the float64 diagonal sums: this checks the u·D the Gram kernel adds on its diagonal
    tiles (T not a multiple of the tile, 190 tile pairs) and the direct path's row norms."""
    for i, shape in enumerate(SHAPES + [(2, 300, 5, 6)]):
        A, G = _pair(*shape, device=KERNEL_DEVICE, seed=i)
        w, b, used, budget = fn.linear_sq_norm_bounds(A, G, with_bias=True, path=path, allow_tf32=True)
        assert used == path and budget.u_w >= 2 * norm_error.TF32_TRUNCATION_U
        assert (budget.u_b > 0) == (path == "gram")  # the direct path's bias is an fp32 column sum
        want_w, want_b = _formula_on_reference(A, G, budget)
        _check(w, want_w, 1e-5)
        _check(b, want_b, 1e-5)


@kernel_test
def test_shared_input_bounds_per_output_gradient():
    """Six Gram-path gradients (launches of 4 and 2 sharing A's Gram): each its own budget and u·D."""
    A, _ = _pair(2, 21, 48, 1, device=KERNEL_DEVICE)
    Gs = [_pair(2, 21, 1, p, device=KERNEL_DEVICE, seed=p)[1] for p in (48, 192, 64, 80, 72, 3)]
    outs = fn.multi_linear_sq_norm_bounds(A, Gs, with_bias=[True] * 6, path="gram", allow_tf32=True)
    for G, (w, b, used, budget) in zip(Gs, outs):
        want_w, want_b = _formula_on_reference(A, G, budget)
        assert used == "gram" and not budget.exact
        _check(w, want_w, 1e-5)
        _check(b, want_b, 1e-5)


@kernel_test
@pytest.mark.parametrize("path", ["gram", "direct"])
def test_exact_budgets_return_the_estimates_unchanged(path):
    A, G = _pair(2, 37, 20, 24, device=KERNEL_DEVICE)
    w, b, _, budget = fn.linear_sq_norm_bounds(A, G, with_bias=True, path=path, allow_tf32=False)
    w0, b0, _ = fn.linear_sq_norms(A, G, with_bias=True, path=path, allow_tf32=False)
    assert budget.exact and budget.key == f"{path} float32 ieee"
    assert torch.equal(w, w0) and torch.equal(b, b0)


@kernel_test
@pytest.mark.parametrize("path", ["gram", "direct"])
def test_bounds_cover_exact_norms_of_adversarial_inputs(path, monkeypatch):
    """End to end through the kernels: fp32 operands rounded to nearest TF32 in the kernel (FLASH_NORMS_TF32_ROUNDING
    =1, which the interpreter executes bit for bit), and bf16 operands; the bound must cover the exact float64 norm
    of the unrounded inputs for rows that cancel, identical rows, rounding-worst mantissas, tiny and huge scales."""
    from tests.kernels.tf32_emulation import CASES

    monkeypatch.setenv(fn.TF32_ROUNDING_ENV, "1")
    for i, (case, make) in enumerate(CASES.items()):
        for dtype in (torch.float32, torch.bfloat16):
            A, G = (x.to(device=KERNEL_DEVICE, dtype=dtype) for x in make(2, 21, 17, 12, i))
            w, b, _, budget = fn.linear_sq_norm_bounds(A, G, with_bias=True, path=path, allow_tf32=True)
            if dtype == torch.float32:
                assert "tf32-rounded" in budget.key
            want_w, want_b = linear_sq_norms_reference(A.double(), G.double(), with_bias=True, path="direct")
            w, b = w * norm_error.coherent_factor(budget.u_w), b * norm_error.coherent_factor(budget.u_b)
            # Up to IEEE fp32 rounding (the direct path's bias is an fp32 sum with no margin): 1e-6, the target's.
            assert (w.double().cpu() >= want_w.cpu() * (1 - 1e-6)).all(), (case, dtype)
            assert (b.double().cpu() >= want_b.cpu() * (1 - 1e-6)).all(), (case, dtype)
            if case == "rounding-down mantissas" and dtype == torch.float32:  # the estimate alone is low here
                w0, _, _ = fn.linear_sq_norms(A, G, with_bias=True, path=path, allow_tf32=True)
                assert (w0.double().cpu() < want_w.cpu() * (1 - 1e-4)).all()


@kernel_test
def test_float64_takes_the_torch_path_exactly():
    A, G = _pair(2, 19, 6, 5, dtype=torch.float64, device=KERNEL_DEVICE)
    w_exp, b_exp = per_sample_gradient_sq_norms(A, G)
    w, b, _ = fn.linear_sq_norms(A, G, with_bias=True)
    assert w.dtype == torch.float64
    torch.testing.assert_close(w.cpu(), w_exp.cpu(), rtol=1e-12, atol=0)
    torch.testing.assert_close(b.cpu(), b_exp.cpu(), rtol=1e-12, atol=0)


def _hopper_compile(kernel, signature: dict, constexprs: dict, **options):
    """Compile ``kernel`` for sm_90 on this machine (no GPU needed): Triton's front end and ptxas, not the
    interpreter, so type and constexpr errors the interpreter forgives show up here."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.skipif(INTERPRET, reason="compiles the real kernels: the parent process")
@pytest.mark.parametrize(("dtype", "prec", "round_"), [("fp32", "tf32", True), ("bf16", "ieee", False)])
def test_gram_kernel_with_bound_compiles_for_hopper(dtype, prec, round_):
    pytest.importorskip("triton.backends.nvidia")
    from memory_test.kernels.flash_norms_triton import gram_kernel

    sig = {"a_ptr": f"*{dtype}", "sa_b": "i32", "sa_t": "i32", "D": "i32"}
    for i in range(4):
        sig |= {f"g{i}": f"*{dtype}", f"s{i}b": "i32", f"s{i}t": "i32", f"P{i}": "i32", f"u{i}w": "fp32",
                f"u{i}b": "fp32"}  # fmt: skip
    sig |= {"w_part": "*fp32", "b_part": "*fp32", "T": "i32", "B": "i32", "n_pairs": "i32"}
    consts = dict(NUM_G=2, BLOCK_T=64, BLOCK_K=32, PREC=prec, UPCAST=False, ROUND=round_, BOUND=True)
    compiled = _hopper_compile(gram_kernel, sig, consts, num_warps=4, num_stages=4)
    assert compiled.asm["cubin"]


@pytest.mark.skipif(KERNEL_DEVICE is not None, reason="kernel tests already run in this process")
def test_kernels_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        __file__,
        "-k",
        "not interpreter and not script and not hopper",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, r.stdout[-3000:]


def test_benchmark_script_cpu_smoke(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_flash_norms.py"), "--device", "cpu",
           "--output", str(out), "--markdown", str(md)]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["rows"] and all(row["max_rel_err"]["auto"] < 1e-4 for row in record["rows"])
    assert md.read_text().strip() in r.stdout
