"""Triton kernels for per-sample squared gradient norms of Linear layers: Gram path and direct path.

Both write one fp32 partial per (sample, program) instead of atomically adding into (B,): the launcher sums the
partials, so results are deterministic and extra memory stays O(B * programs per sample), a few KB per sample.
With BOUND the Gram kernel adds u_w·D and u_b·Σ_t ||G_t||² to the weight and bias partials of its diagonal tile
pairs, D = Σ_t ||A_t||²·||G_t||² (the row-incoherent scale of the rounding error, memory_test.kernels.norm_error):
the bound's data-dependent term at no extra launch or memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Kernel arguments stay grouped per tensor (pointer, strides, size) on shared lines; the formatter would put each
# of the ~30 on its own line.
# fmt: off

@triton.jit
def _round_tf32(x):
    """fp32 -> the nearest TF32 value (ties away from zero), still fp32: the tensor cores then drop only zero bits,
    instead of truncating the 13 low mantissa bits (which biases every product toward zero)."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _gram_tile(base, stride_t, T, K, rows_j, rows_k, DIAG: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, ROUND: tl.constexpr):
    """X[rows_j] @ X[rows_k]ᵀ for one sample's (T, K) row-major matrix X, reduced over K in BLOCK_K chunks, fp32."""
    cols = tl.arange(0, BLOCK_K)
    ptr_j = base + rows_j[:, None] * stride_t + cols[None, :]
    ptr_k = base + rows_k[:, None] * stride_t + cols[None, :]
    in_j = rows_j[:, None] < T
    in_k = rows_k[:, None] < T
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for c0 in range(0, K, BLOCK_K):
        # Masks compare the constant arange with a scalar (as in Triton's matmul tutorial) so the compiler can
        # prove them uniform over 16-element groups: vector loads, async copies and a pipelined loop.
        in_c = cols[None, :] < K - c0
        x = tl.load(ptr_j, mask=in_j & in_c, other=0.0)
        if DIAG:  # a diagonal tile pair reads its rows once
            y = x
        else:
            y = tl.load(ptr_k, mask=in_k & in_c, other=0.0)
        ptr_j += BLOCK_K
        ptr_k += BLOCK_K
        if UPCAST:  # the interpreter's tl.dot multiplies bfloat16 bit patterns as integers
            x, y = x.to(tl.float32), y.to(tl.float32)
        if ROUND:
            x = _round_tf32(x)
            y = x if DIAG else _round_tf32(y)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PREC)
    return acc


@triton.jit
def _gram_store(sa, g_ptr, s_t, P, T, rows_j, rows_k, w_out, b_out, u_w, u_b, DIAG: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                ROUND: tl.constexpr, BOUND: tl.constexpr):
    """Dot one output-gradient Gram tile with the shared input Gram tile; store the weight and bias partials."""
    sg = _gram_tile(g_ptr, s_t, T, P, rows_j, rows_k, DIAG, BLOCK_T, BLOCK_K, PREC, UPCAST, ROUND)
    prod = sa * sg
    w = tl.sum(prod)
    # ||Σ_t g_t||² is the sum of every entry of G Gᵀ: the bias norm comes free with the Gram tiles.
    b = tl.sum(sg)
    if BOUND:
        if DIAG:  # row t's ||A_t||² and ||G_t||² sit on the diagonal of the diagonal tile pairs only
            on_diag = rows_j[:, None] == rows_k[None, :]
            w += u_w * tl.sum(tl.where(on_diag, prod, 0.0))
            b += u_b * tl.sum(tl.where(on_diag, sg, 0.0))
    # Off-diagonal tile pairs stand for both (j, k) and (k, j) of the symmetric Grams.
    scale = 1.0 if DIAG else 2.0
    tl.store(w_out, w * scale)
    tl.store(b_out, b * scale)


@triton.jit
def _gram_pair(a_ptr, sa_t, D, g0, s0t, P0, u0w, u0b, g1, s1t, P1, u1w, u1b, g2, s2t, P2, u2w, u2b, g3, s3t, P3, u3w,
               u3b, w_out, b_out, plane, T, rows_j, rows_k, NUM_G: tl.constexpr, DIAG: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
               ROUND: tl.constexpr, BOUND: tl.constexpr):
    """The input Gram tile once, then each output gradient's Gram tile against it."""
    sa = _gram_tile(a_ptr, sa_t, T, D, rows_j, rows_k, DIAG, BLOCK_T, BLOCK_K, PREC, UPCAST, ROUND)
    _gram_store(sa, g0, s0t, P0, T, rows_j, rows_k, w_out, b_out, u0w, u0b, DIAG, BLOCK_T, BLOCK_K, PREC, UPCAST,
                ROUND, BOUND)
    if NUM_G > 1:
        _gram_store(sa, g1, s1t, P1, T, rows_j, rows_k, w_out + plane, b_out + plane, u1w, u1b, DIAG, BLOCK_T,
                    BLOCK_K, PREC, UPCAST, ROUND, BOUND)
    if NUM_G > 2:
        _gram_store(sa, g2, s2t, P2, T, rows_j, rows_k, w_out + 2 * plane, b_out + 2 * plane, u2w, u2b, DIAG,
                    BLOCK_T, BLOCK_K, PREC, UPCAST, ROUND, BOUND)
    if NUM_G > 3:
        _gram_store(sa, g3, s3t, P3, T, rows_j, rows_k, w_out + 3 * plane, b_out + 3 * plane, u3w, u3b, DIAG,
                    BLOCK_T, BLOCK_K, PREC, UPCAST, ROUND, BOUND)


@triton.jit
def gram_kernel(
    a_ptr, sa_b, sa_t, D,
    g0, s0b, s0t, P0, u0w, u0b,
    g1, s1b, s1t, P1, u1w, u1b,
    g2, s2b, s2t, P2, u2w, u2b,
    g3, s3b, s3t, P3, u3w, u3b,
    w_part, b_part, T, B, n_pairs,
    NUM_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ROUND: tl.constexpr, BOUND: tl.constexpr,
):
    """One program per (upper-triangular T-tile pair, sample): Σ (A Aᵀ)∘(G Gᵀ) over the tile for up to 4 Gs
    (with BOUND plus u_w·D, and u_b·Σ_t ||G_t||² for the bias, on diagonal tile pairs: ``uNw``, ``uNb`` per G)."""
    pid = tl.program_id(0)
    sample = tl.program_id(1).to(tl.int64)  # int64: sample * batch stride can pass 2**31 elements
    # Invert pid = k(k+1)/2 + j (0 <= j <= k); the float root is exact to +-1 for any realistic tile count.
    k = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    k = tl.where((k + 1) * (k + 2) // 2 <= pid, k + 1, k)
    k = tl.where(k * (k + 1) // 2 > pid, k - 1, k)
    j = pid - k * (k + 1) // 2
    rows_j = j * BLOCK_T + tl.arange(0, BLOCK_T)
    rows_k = k * BLOCK_T + tl.arange(0, BLOCK_T)
    a = a_ptr + sample * sa_b
    out = sample * n_pairs + pid
    plane = B * n_pairs
    if j == k:
        _gram_pair(a, sa_t, D, g0 + sample * s0b, s0t, P0, u0w, u0b, g1 + sample * s1b, s1t, P1, u1w, u1b,
                   g2 + sample * s2b, s2t, P2, u2w, u2b, g3 + sample * s3b, s3t, P3, u3w, u3b, w_part + out,
                   b_part + out, plane, T, rows_j, rows_k, NUM_G, True, BLOCK_T, BLOCK_K, PREC, UPCAST, ROUND, BOUND)
    else:
        _gram_pair(a, sa_t, D, g0 + sample * s0b, s0t, P0, u0w, u0b, g1 + sample * s1b, s1t, P1, u1w, u1b,
                   g2 + sample * s2b, s2t, P2, u2w, u2b, g3 + sample * s3b, s3t, P3, u3w, u3b, w_part + out,
                   b_part + out, plane, T, rows_j, rows_k, NUM_G, False, BLOCK_T, BLOCK_K, PREC, UPCAST, ROUND, BOUND)


@triton.jit
def _direct_loop(a_base, g_base, sa_t, sg_t, T, offs_d, offs_p, in_d, in_p,
                 COLSUM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, ROUND: tl.constexpr):
    """Σ_t A[t, d-tile]ᵀ G[t, p-tile] in fp32 registers, and (if COLSUM) Σ_t G[t, p-tile]."""
    acc = tl.zeros((BLOCK_D, BLOCK_P), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    steps = tl.arange(0, BLOCK_T)
    # A is read already transposed (BLOCK_D x BLOCK_T) so the dot reduces over rows t; features are unit-stride.
    a_ptr = a_base + offs_d[:, None] + steps[None, :] * sa_t
    g_ptr = g_base + steps[:, None] * sg_t + offs_p[None, :]
    for t0 in range(0, T, BLOCK_T):
        # Row masks compare the constant arange with a scalar, as in Triton's matmul tutorial, so the loads
        # stay vectorised and the loop pipelined.
        a = tl.load(a_ptr, mask=in_d[:, None] & (steps[None, :] < T - t0), other=0.0)
        g = tl.load(g_ptr, mask=(steps[:, None] < T - t0) & in_p[None, :], other=0.0)
        a_dot, g_dot = a.to(DOT_DTYPE), g.to(DOT_DTYPE)
        if ROUND:
            a_dot, g_dot = _round_tf32(a_dot), _round_tf32(g_dot)
        acc = tl.dot(a_dot, g_dot, acc, input_precision=PREC)
        if COLSUM:
            colsum += tl.sum(g.to(tl.float32), axis=0)
        a_ptr += BLOCK_T * sa_t
        g_ptr += BLOCK_T * sg_t
    return acc, colsum


@triton.jit
def direct_kernel(
    a_ptr, sa_b, sa_t, D,
    g_ptr, sg_b, sg_t, P,
    w_part, b_part, T,
    HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
    GROUP_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, ROUND: tl.constexpr,
):
    """One program per ((d-tile, p-tile), sample): ||A_iᵀG_i||² restricted to the tile, never written to memory."""
    pid = tl.program_id(0)
    sample = tl.program_id(1).to(tl.int64)
    n_d = tl.cdiv(D, BLOCK_D)
    n_p = tl.cdiv(P, BLOCK_P)
    # Grouped order (as in Triton's matmul tutorial): concurrent programs share A and G tiles in L2.
    width = GROUP_D * n_p
    first_d = (pid // width) * GROUP_D
    group = tl.minimum(n_d - first_d, GROUP_D)
    pid_d = first_d + (pid % width) % group
    pid_p = (pid % width) // group
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    in_d = offs_d < D
    in_p = offs_p < P
    a_base = a_ptr + sample * sa_b
    g_base = g_ptr + sample * sg_b
    if HAS_BIAS:
        # Only the first d-tile column also sums G's rows: the bias norm without a second read of G, and the
        # other programs keep a loop with nothing but loads and the dot.
        if pid_d == 0:
            acc, colsum = _direct_loop(a_base, g_base, sa_t, sg_t, T, offs_d, offs_p, in_d, in_p,
                                       True, BLOCK_D, BLOCK_P, BLOCK_T, DOT_DTYPE, PREC, ROUND)
            tl.store(b_part + sample * n_p + pid_p, tl.sum(colsum * colsum))
        else:
            acc, colsum = _direct_loop(a_base, g_base, sa_t, sg_t, T, offs_d, offs_p, in_d, in_p,
                                       False, BLOCK_D, BLOCK_P, BLOCK_T, DOT_DTYPE, PREC, ROUND)
    else:
        acc, colsum = _direct_loop(a_base, g_base, sa_t, sg_t, T, offs_d, offs_p, in_d, in_p,
                                   False, BLOCK_D, BLOCK_P, BLOCK_T, DOT_DTYPE, PREC, ROUND)
    tl.store(w_part + sample * (n_d * n_p) + pid, tl.sum(acc * acc))
# fmt: on
