"""Per-sample squared gradient norms of Linear layers ("flash" norms): path choice, backend choice, launchers.

A is a layer's input (B, T, d) or (B, d), G its output gradient (B, T, p) or (B, p). Results are fp32 (float64 for
float64 inputs). Backends: "triton" runs the fused kernels (CUDA, or CPU under TRITON_INTERPRET=1); "torch" runs
the plain-torch reference formulas. float64 inputs always take the torch path (the kernels accumulate in fp32),
so exactness tests in float64 stay exact whatever the device; asking for backend="triton" with float64 is an error.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import flash_norms_tuning as tuning
from . import norm_error
from .flash_norms_reference import accumulate_dtype, as_rows, check_pair, linear_sq_norms_reference

PATHS = ("gram", "direct", "outer")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_GRID_Y = 65535  # CUDA's limit on the grid axis that carries the samples
_MAX_SHARED_G = 4  # output gradients the Gram kernel dots against one input Gram per launch


# The Gram path costs ≈T²(d+p) flops (upper triangle of tile pairs), the direct path 2Tdp; the crossover is at
# T = GRAM_ADVANTAGE · dp/(d+p). Measured on an H200 (results/flash_norms/, B=128, DiT-XL/2 shapes): in bf16 the
# direct kernel runs at 55-63% of the tensor-core roof and Gram wins at T=1024, direct at T=4096 (2.0 fits);
# in fp32 (TF32) the direct kernel reaches only ~45 TFLOP/s against Gram's 130-190, and Gram still wins at T=4096.
GRAM_ADVANTAGE = {torch.float32: 8.0, torch.bfloat16: 2.0, torch.float16: 2.0}


def choose_path(T: int, d: int, p: int, dtype: torch.dtype = torch.float32) -> str:
    """'outer' for one row per sample, else 'gram' when T(d+p) < GRAM_ADVANTAGE[dtype]·dp, else 'direct'."""
    if T <= 1:
        return "outer"
    return "gram" if T * (d + p) < GRAM_ADVANTAGE.get(dtype, GRAM_ADVANTAGE[torch.float32]) * d * p else "direct"


def _dot_dtype(A: torch.Tensor, G: torch.Tensor) -> torch.dtype:
    """The precision the kernels multiply in: 16-bit only when both operands are 16-bit."""
    return A.dtype if A.dtype == G.dtype else torch.float32


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_tracing = torch.compiler.is_dynamo_compiling  # True while Dynamo traces a program that calls these launchers


def kernel_backend(device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """'triton' on CUDA (or CPU under TRITON_INTERPRET=1), 'torch' elsewhere and for float64 inputs."""
    device = torch.device(device)
    if dtype == torch.float64:
        return "torch"
    if device.type == "cuda" or (device.type == "cpu" and _interpret()):
        return "triton"
    return "torch"


def _resolve_backend(backend: str, device: torch.device, dtypes: list[torch.dtype]) -> str:
    if backend == "auto":
        return kernel_backend(device, torch.float64 if torch.float64 in dtypes else None)
    if backend == "torch":
        return "torch"
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'triton' or 'torch'")
    if kernel_backend(device) != "triton":
        raise RuntimeError(f"the Triton kernels need a CUDA device or TRITON_INTERPRET=1 on CPU, got {device}")
    bad = [dt for dt in dtypes if dt not in KERNEL_DTYPES]
    if bad:
        raise ValueError(f"the Triton kernels take {KERNEL_DTYPES}, got {bad}; use backend='torch' for these")
    return "triton"


def _resolve_path(path: str, T: int, d: int, p: int, dtype: torch.dtype) -> str:
    if path == "auto":
        return choose_path(T, d, p, dtype)
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected 'auto' or one of {PATHS}")
    if path == "outer" and T != 1:
        raise ValueError(f"the outer path needs one row per sample, got {T}")
    return path


TF32_ROUNDING_ENV = "FLASH_NORMS_TF32_ROUNDING"


def tf32_rounding() -> bool:
    """FLASH_NORMS_TF32_ROUNDING=1: round fp32 operands to the nearest TF32 value before TF32 dots (see NOTES).

    Off by default until its cost is measured on a GPU: without it the tensor cores truncate, which biases fp32+TF32
    norms low by ~0.07%; with it the error is unbiased, like cuBLAS' TF32. The clipping margin covers either
    (norm_error: operand budget 2^-10 truncated, 2^-11 rounded), so rounding only buys a smaller margin.
    """
    value = os.environ.get(TF32_ROUNDING_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{TF32_ROUNDING_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def _precision(device: torch.device, dtypes, allow_tf32: bool | None) -> str:
    """tl.dot input precision for fp32 operands; ignored by the kernels for 16-bit ones."""
    if torch.float32 not in dtypes:
        return "ieee"
    if device.type != "cuda":  # the interpreter multiplies in exact fp32 whatever the precision
        return "tf32" if allow_tf32 is True else "ieee"  # explicit True: lets CPU tests exercise the TF32 branch
    if allow_tf32 is None:  # same switch as torch's own fp32 matmuls (and so Opacus' einsum)
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allow_tf32 else "ieee"


def _rows_major(x: torch.Tensor) -> torch.Tensor:
    """Unit stride along features (the kernels assume it: coalesced loads); batch and row strides may be anything."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _on(device: torch.device):
    """Triton launches on the current CUDA device, not the tensors': make them the same."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _tensor_cores(dtype: torch.dtype, prec: str) -> bool:
    """Whether a tl.dot of ``dtype`` operands runs on tensor cores (16-bit always; fp32 only as TF32)."""
    return dtype != torch.float32 or prec == "tf32"


def _gram_launch(A: torch.Tensor, Gs: list[torch.Tensor], allow_tf32: bool | None, bound: bool = False):
    """Weight and bias partial sums (len(Gs), B) for Gs sharing input A, via one input Gram per tile pair.

    With ``bound``: each G's squared norms plus its budget's u·D (``norm_error.incoherent_term``, added by the
    kernel on its diagonal tile pairs), and the budgets as a third item.
    """
    B, T, d = A.shape
    prec = _precision(A.device, [A.dtype, *(g.dtype for g in Gs)], allow_tf32)
    upcast = _interpret() and torch.bfloat16 in (A.dtype, *(g.dtype for g in Gs))
    round_ = prec == "tf32" and tf32_rounding()
    budgets = [_gram_budget(A.dtype, g.dtype, d, g.shape[-1], prec, round_) for g in Gs]
    with_d = bound and not all(b.exact for b in budgets)
    us = [u for b in budgets for u in ((b.u_w, b.u_b) if with_d else (0.0, 0.0))]
    run = flash_gram_norms if _tracing() else _gram_norms  # an op in a traced program, a plain call eagerly
    w, b = run(A, Gs, us, prec, upcast, round_, with_d)
    return (w, b, budgets) if bound else (w, b)


def _gram_norms(
    A: torch.Tensor, Gs: list[torch.Tensor], us: list[float], prec: str, upcast: bool, round_: bool, with_d: bool
) -> torch.Tensor:
    """The Gram kernel's launcher: (2, len(Gs), B) weight and bias sums; ``us`` = (u_w, u_b) of each G, flat."""
    from triton import cdiv

    from .flash_norms_triton import gram_kernel

    B, T, d = A.shape
    pairs = [(us[2 * i], us[2 * i + 1]) for i in range(len(Gs))] + [(0.0, 0.0)] * (_MAX_SHARED_G - len(Gs))
    padded = Gs + [Gs[0]] * (_MAX_SHARED_G - len(Gs))  # unused slots: NUM_G stops the kernel before them

    def run(cfg):
        n_t = cdiv(T, cfg["BLOCK_T"])
        n_pairs = n_t * (n_t + 1) // 2
        # Weight and bias partials in one buffer: one allocation and one reduction per call.
        parts = torch.empty(2, len(Gs), B, n_pairs, device=A.device, dtype=torch.float32)
        for lo in range(0, B, _MAX_GRID_Y):
            n = min(_MAX_GRID_Y, B - lo)
            a, gs = A[lo : lo + n], [g[lo : lo + n] for g in padded]
            g_args = [v for g, u in zip(gs, pairs) for v in (g, g.stride(0), g.stride(1), g.shape[-1], *u)]
            gram_kernel[(n_pairs, n)](
                a, a.stride(0), a.stride(1), d, *g_args, parts[0, :, lo:], parts[1, :, lo:], T, B, n_pairs,
                NUM_G=len(Gs), BLOCK_T=cfg["BLOCK_T"], BLOCK_K=cfg["BLOCK_K"], PREC=prec, UPCAST=upcast, ROUND=round_,
                BOUND=with_d, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )  # fmt: skip
        return parts

    key = (T, d, tuple(g.shape[-1] for g in Gs), A.dtype, tuple(g.dtype for g in Gs), prec, round_, with_d,
           A.device.index)  # fmt: skip
    elem = max(x.element_size() for x in (A, *Gs))
    with _on(A.device):
        return run(tuning.pick_config("gram", key, run, interpret=_interpret(), elem_bytes=elem)).sum(dim=-1)


# The launchers as operators, for traced programs (memory_test.privacy.post_programs): Dynamo and Inductor call them
# as opaque kernels (the launcher's tuning and Python stay outside the graph); the fake versions give the shapes.
flash_gram_norms = torch.library.custom_op("memory_test::flash_gram_norms", _gram_norms, mutates_args=())


@flash_gram_norms.register_fake
def _gram_norms_fake(A, Gs, us, prec, upcast, round_, with_d):
    return A.new_empty((2, len(Gs), A.shape[0]), dtype=torch.float32)


def _gram_budget(a_dtype, g_dtype, d, p, prec, round_) -> norm_error.ErrorBudget:
    tf32_u = norm_error.TF32_ROUNDING_U if round_ else norm_error.TF32_TRUNCATION_U
    cores_a, cores_g = _tensor_cores(a_dtype, prec), _tensor_cores(g_dtype, prec)
    return norm_error.gram_budget(a_dtype, g_dtype, d, p, tensor_cores_a=cores_a, tensor_cores_g=cores_g,
                                  tf32=prec == "tf32", tf32_u=tf32_u)  # fmt: skip


def _direct_launch(A: torch.Tensor, G: torch.Tensor, with_bias: bool, allow_tf32: bool | None):
    """Weight and bias (or None) squared norms (B,) via A_iᵀG_i tiles reduced in registers."""
    dot_dtype = A.dtype if A.dtype == G.dtype else torch.promote_types(A.dtype, G.dtype)
    if _interpret() and dot_dtype == torch.bfloat16:
        dot_dtype = torch.float32  # the interpreter's tl.dot multiplies bfloat16 bit patterns as integers
    prec = _precision(A.device, [dot_dtype], allow_tf32)
    round_ = prec == "tf32" and tf32_rounding()
    run = flash_direct_norms if _tracing() else _direct_norms
    w, b = run(A, G, with_bias, dot_dtype, prec, round_)
    return w, (b if with_bias else None)


def _direct_norms(
    A: torch.Tensor, G: torch.Tensor, with_bias: bool, dot_dtype: torch.dtype, prec: str, round_: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The direct kernel's launcher: weight and bias squared norms (B,) (the bias ones empty without a bias)."""
    from triton import cdiv

    from .flash_norms_triton import direct_kernel

    B, T, d = A.shape
    p = G.shape[-1]

    def run(cfg):
        n_p = cdiv(p, cfg["BLOCK_P"])
        n_tiles = cdiv(d, cfg["BLOCK_D"]) * n_p
        w = torch.empty(B, n_tiles, device=A.device, dtype=torch.float32)
        b = torch.empty(B, n_p, device=A.device, dtype=torch.float32)
        for lo in range(0, B, _MAX_GRID_Y):
            n = min(_MAX_GRID_Y, B - lo)
            a, g = A[lo : lo + n], G[lo : lo + n]
            direct_kernel[(n_tiles, n)](
                a, a.stride(0), a.stride(1), d, g, g.stride(0), g.stride(1), p, w[lo:], b[lo:], T,
                HAS_BIAS=with_bias, BLOCK_D=cfg["BLOCK_D"], BLOCK_P=cfg["BLOCK_P"], BLOCK_T=cfg["BLOCK_T"],
                GROUP_D=cfg["GROUP_D"], DOT_DTYPE=_tl_dtype(dot_dtype), PREC=prec, ROUND=round_,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )  # fmt: skip
        return w, b

    key = (T, d, p, A.dtype, G.dtype, with_bias, prec, round_, A.device.index)
    elem = max(A.element_size(), G.element_size())
    with _on(A.device):
        w, b = run(tuning.pick_config("direct", key, run, interpret=_interpret(), elem_bytes=elem))
    return w.sum(dim=1), (b.sum(dim=1) if with_bias else w.new_empty(0))


flash_direct_norms = torch.library.custom_op("memory_test::flash_direct_norms", _direct_norms, mutates_args=())


@flash_direct_norms.register_fake
def _direct_norms_fake(A, G, with_bias, dot_dtype, prec, round_):
    return A.new_empty(A.shape[0], dtype=torch.float32), A.new_empty(
        A.shape[0] if with_bias else 0, dtype=torch.float32
    )


def _direct_budget(A, G, allow_tf32) -> norm_error.ErrorBudget:
    """The budget of _direct_launch's dot (same dtype and precision rules)."""
    dot_dtype = A.dtype if A.dtype == G.dtype else torch.promote_types(A.dtype, G.dtype)
    prec = _precision(A.device, [dot_dtype], allow_tf32)
    round_ = prec == "tf32" and tf32_rounding()
    tf32_u = norm_error.TF32_ROUNDING_U if round_ else norm_error.TF32_TRUNCATION_U
    return norm_error.direct_budget(A.dtype, G.dtype, A.shape[1], tensor_cores=_tensor_cores(dot_dtype, prec),
                                    tf32=prec == "tf32", tf32_u=tf32_u)  # fmt: skip


def _with_incoherent_term(w, b, budget: norm_error.ErrorBudget, A, G):
    """The torch paths' w + u_w·D and b + u_b·D_b (row norms read once more; nothing to add when exact)."""
    if budget.exact:
        return w, b
    dw, db = norm_error.incoherent_sums(A, G)
    return (norm_error.incoherent_term(w, budget.u_w, dw),
            None if b is None else norm_error.incoherent_term(b, budget.u_b, db))  # fmt: skip


def _linear(A, G, with_bias, path, backend, allow_tf32, bound):
    """(w, b, path) estimates, or with ``bound`` (w + u·D, b + u_b·D_b, path, budget) (see norm_error)."""
    A, G = check_pair(A, G)
    B, T, d = A.shape
    chosen = _resolve_path(path, T, d, G.shape[-1], _dot_dtype(A, G))
    be = _resolve_backend(backend, A.device, [A.dtype, G.dtype])
    if be == "torch" or chosen == "outer" or A.numel() == 0 or G.numel() == 0:
        # outer: two row norms per sample, no GEMM worth a kernel; empty inputs: nothing to launch.
        w, b = linear_sq_norms_reference(A, G, with_bias=with_bias, path=chosen)
        if not bound:
            return w, b, chosen
        budget = norm_error.torch_budget(chosen, A, G, accumulate_dtype(A, G))
        return *_with_incoherent_term(w, b, budget, A, G), chosen, budget
    A, G = _rows_major(A), _rows_major(G)
    if chosen == "gram":
        out = _gram_launch(A, [G], allow_tf32, bound=bound)
        w, b = out[0][0], (out[1][0] if with_bias else None)
        return (w, b, chosen, out[2][0]) if bound else (w, b, chosen)
    w, b = _direct_launch(A, G, with_bias, allow_tf32)
    if not bound:
        return w, b, chosen
    budget = _direct_budget(A, G, allow_tf32)
    return *_with_incoherent_term(w, b, budget, A, G), chosen, budget


def linear_sq_norms(
    A: torch.Tensor,
    G: torch.Tensor,
    *,
    with_bias: bool,
    path: str = "auto",
    backend: str = "auto",
    allow_tf32: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(||A_iᵀG_i||², ||Σ_t G_i,t||² or None, path used) per sample; allow_tf32=None follows torch's matmul flag."""
    return _linear(A, G, with_bias, path, backend, allow_tf32, bound=False)


def linear_sq_norm_bounds(
    A: torch.Tensor,
    G: torch.Tensor,
    *,
    with_bias: bool,
    path: str = "auto",
    backend: str = "auto",
    allow_tf32: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, str, norm_error.ErrorBudget]:
    """As ``linear_sq_norms``, plus the error budget used, with each squared norm raised by its incoherent term u·D:
    k(budget.u_w) times it is an upper bound of the exact one (memory_test.kernels.norm_error; callers summing
    several layers apply the largest k once). Exact budgets (IEEE fp32, float64) leave the estimates unchanged."""
    return _linear(A, G, with_bias, path, backend, allow_tf32, bound=True)


def _multi(A, Gs, with_bias, path, backend, allow_tf32, bound):
    if len(with_bias) != len(Gs):
        raise ValueError(f"{len(Gs)} output gradients but {len(with_bias)} with_bias flags")
    A = as_rows(A)
    Gs = [check_pair(A, G)[1] for G in Gs]
    B, T, d = A.shape
    paths = [_resolve_path(path, T, d, G.shape[-1], _dot_dtype(A, G)) for G in Gs]
    be = _resolve_backend(backend, A.device, [A.dtype, *(G.dtype for G in Gs)])
    out: list = [None] * len(Gs)
    shared = [i for i, pth in enumerate(paths) if pth == "gram"] if be == "triton" and A.numel() else []
    if shared:
        A_rows = _rows_major(A)
        for lo in range(0, len(shared), _MAX_SHARED_G):
            idx = shared[lo : lo + _MAX_SHARED_G]
            launched = _gram_launch(A_rows, [_rows_major(Gs[i]) for i in idx], allow_tf32, bound=bound)
            for k, i in enumerate(idx):
                w, b = launched[0][k], (launched[1][k] if with_bias[i] else None)
                out[i] = (w, b, "gram", launched[2][k]) if bound else (w, b, "gram")
    for i, G in enumerate(Gs):
        if out[i] is None:
            out[i] = _linear(A, G, with_bias[i], paths[i], be, allow_tf32, bound)
    return out


def multi_linear_sq_norms(
    A: torch.Tensor,
    Gs: list[torch.Tensor],
    *,
    with_bias: list[bool],
    path: str = "auto",
    backend: str = "auto",
    allow_tf32: bool | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor | None, str]]:
    """linear_sq_norms for layers fed the same input A (q, k, v): Gram-path layers share each A-Gram tile."""
    return _multi(A, Gs, with_bias, path, backend, allow_tf32, bound=False)


def multi_linear_sq_norm_bounds(
    A: torch.Tensor,
    Gs: list[torch.Tensor],
    *,
    with_bias: list[bool],
    path: str = "auto",
    backend: str = "auto",
    allow_tf32: bool | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor | None, str, norm_error.ErrorBudget]]:
    """linear_sq_norm_bounds for layers fed the same input A (q, k, v): Gram-path layers share each A-Gram tile."""
    return _multi(A, Gs, with_bias, path, backend, allow_tf32, bound=True)
