"""Per-layer rules: exact per-sample squared gradient norms and clipped gradients from cached (A, G) pairs.

Every rule works on all uses of one module in one forward at once. A module used k times has per-sample
gradient equal to the sum over its uses, so its norm needs the cross terms between uses; for Linear-like
layers that is the same as treating the uses as extra rows of A and G (rows are concatenated per sample).

Rows: a use's batch dimension holds ``n * K`` rows in sample-major order (noise multiplicity K); every rule
first views them as ``(n, K * ..., features)`` so that one sample's rows form one privacy unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .errors import LayoutError

_tracing = torch.compiler.is_dynamo_compiling  # ~80 ns: True while Dynamo traces (memory_test.privacy.post_programs)


@dataclass(slots=True)
class Use:
    """One forward call of a trainable module: its detached inputs and, after backward, its output gradient."""

    inputs: tuple
    grad_output: torch.Tensor | None = None
    held: list = field(default_factory=list)  # StepCache keys of the storages this use references
    batch_dim: int = 0  # where the samples are in the layer's own tensors (inputs above are moved sample-first)
    boundary: frozenset = frozenset()  # ids of the input nodes / leaf inputs (coverage walk)
    refs: tuple = ()  # keeps the nodes and tensors behind ``boundary`` (and the tap node) alive during the step

    def release(self) -> None:
        self.inputs, self.grad_output, self.held, self.refs = (), None, [], ()

    def tensors(self) -> list[torch.Tensor]:
        held = [t for t in self.inputs if isinstance(t, torch.Tensor)]
        if self.grad_output is not None:
            held.append(self.grad_output)
        return held


def _trainable(param: torch.Tensor | None) -> bool:
    return param is not None and param.requires_grad


def check_rows(rows: int, n: int) -> None:
    """A layer's batch dimension must hold K whole rows per per-sample loss."""
    if n == 0 or rows % n:
        raise LayoutError(f"a layer saw {rows} rows, not a multiple of the {n} per-sample losses")


def _per_sample_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """(n*K, ..., f) -> (n, K*..., f): the rows of each sample, contiguous in sample-major order.

    The engine's layout check has verified that dimension 0 (after moving the layer's batch dimension there) holds
    each sample's rows as one contiguous block, so the reshape groups exactly one sample's rows.
    """
    check_rows(x.shape[0], n)
    return x.reshape(n, -1, x.shape[-1])


class ClipCoefficients:
    """The step's clipping coefficients c_i, with what every layer derives from them computed once.

    Per-dtype copies, per-row expansions, and the last row-scaled operand: q, k and v share one input, so their
    clipped gradients share one scaled copy of it.
    """

    def __init__(self, values: torch.Tensor):
        self.values = values
        self._cast: dict = {}
        self._rows: dict = {}
        self._last_scaled: tuple | None = None

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """c as a (n, 1, ..., 1) tensor in x's dtype and device."""
        key = (x.dtype, x.device, x.dim())
        if key not in self._cast:
            self._cast[key] = self.values.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return self._cast[key]

    def per_row(self, rows_per_sample: int, x: torch.Tensor) -> torch.Tensor:
        """c repeated for each of a sample's rows, (n * rows_per_sample,), in x's dtype."""
        key = (rows_per_sample, x.dtype, x.device)
        if key not in self._rows:
            self._rows[key] = self.like(x).reshape(-1).repeat_interleave(rows_per_sample)
        return self._rows[key]

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """c_i * x_i for x of shape (n, R, f); the last result is reused for the same input (the cache holds x,
        so its storage cannot be recycled under the key). A traced program has no storages to key on: its graph
        shares the product of equal inputs itself (common-subexpression elimination)."""
        if _tracing():
            return x * self.like(x)
        key = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)
        if self._last_scaled is not None and self._last_scaled[0] == key:
            return self._last_scaled[2]
        scaled = x * self.like(x)
        self._last_scaled = (key, x, scaled)
        return scaled


def weight_and_bias_grads(weight, gw, bias, gb) -> dict:
    """{parameter: clipped gradient in its own shape and dtype} for the parts that were computed."""
    grads = {}
    if gw is not None:
        grads[weight] = gw.reshape(weight.shape).to(weight.dtype)
    if gb is not None:
        grads[bias] = gb.to(bias.dtype)
    return grads


def as_coefficients(coef) -> ClipCoefficients:
    return coef if isinstance(coef, ClipCoefficients) else ClipCoefficients(coef)


def matmul_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Lowest-precision floating dtype among the operands: the dtype autocast's own weight-gradient GEMM uses."""
    return min((t.dtype for t in tensors), key=lambda d: torch.finfo(d).bits)


class LinearLikeRule:
    """Layers whose per-sample gradient is G_iᵀ A_i over rows (Linear; Conv2d after unfolding)."""

    name = "linear"
    summary = "exact norms (Gram or direct, per backend) from cached A and G; clipped gradient (c⊙G)ᵀA"
    refuses = ""
    batch_dims = (0, 1)  # (N, ..., f) or sequence-first (T, N, f): rows are moved sample-first

    @staticmethod
    def supports(module) -> str | None:
        return None

    def fold(self, per_row_sample: torch.Tensor, module, n: int) -> torch.Tensor:
        """Per-(row-block) squared norms -> per-sample (Conv2d groups are extra row blocks of one sample)."""
        return per_row_sample

    def weight_and_bias(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return module.weight, module.bias

    def rows(self, module: nn.Module, use: Use, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _per_sample_rows(use.inputs[0], n), _per_sample_rows(use.grad_output, n)

    def _stacked(self, module, uses, n):
        pairs = [self.rows(module, u, n) for u in uses]
        if len(pairs) == 1:
            return pairs[0]
        return torch.cat([a for a, _ in pairs], dim=1), torch.cat([g for _, g in pairs], dim=1)

    def sq_norm(self, module, uses, n, backend) -> tuple[torch.Tensor, str]:
        weight, bias = self.weight_and_bias(module)
        A, G = self._stacked(module, uses, n)
        w_sq, b_sq, path = backend.linear_sq_norms(A, G, with_bias=_trainable(bias))
        total = w_sq if _trainable(weight) else torch.zeros_like(w_sq)
        if b_sq is not None:
            total = total + b_sq
        return self.fold(total, module, n), path

    def group_sq_norms(self, modules, uses, n, backend) -> list[tuple[torch.Tensor, str]]:
        """Linears fed one input (one use each): the backend may share the input's Gram across them."""
        A = _per_sample_rows(uses[0].inputs[0], n)
        Gs = [_per_sample_rows(u.grad_output, n) for u in uses]
        with_bias = [_trainable(m.bias) for m in modules]
        out = []
        for m, (w_sq, b_sq, path) in zip(modules, backend.multi_linear_sq_norms(A, Gs, with_bias=with_bias)):
            total = w_sq if _trainable(m.weight) else torch.zeros_like(w_sq)
            out.append((total + b_sq if b_sq is not None else total, path))
        return out

    def clipped_grads(self, module, uses, n, coef) -> dict:
        weight, bias = self.weight_and_bias(module)
        w_on, b_on = _trainable(weight), _trainable(bias)
        clip = as_coefficients(coef)
        gw = gb = None
        for use in uses:
            A, G = self.rows(module, use, n)
            d, p = A.shape[-1], G.shape[-1]
            if w_on:
                # Σ_i c_i G_iᵀA_i: the coefficients scale the rows of whichever operand is smaller (a temporary
                # of min(d, p) columns), and the GEMM replaces the weight-gradient GEMM the backward skipped.
                dtype = A.dtype if A.dtype == G.dtype else matmul_dtype(A, G)
                lhs, rhs = (G, clip.scale(A)) if d <= p else (clip.scale(G), A)
                g = lhs.reshape(-1, p).to(dtype).t() @ rhs.reshape(-1, d).to(dtype)
                gw = g if gw is None else gw + g
            if b_on:  # Σ_rows c_row G_row: one GEMV
                G2 = G.reshape(-1, p)
                g = clip.per_row(G.shape[1], G2) @ G2
                gb = g if gb is None else gb + g
        return weight_and_bias_grads(weight, gw, bias, gb)

    def stacked_sq_norms(self, modules, uses, n, backend) -> tuple[torch.Tensor, str]:
        """Σ of ``sq_norm`` over same-shape Linears (one use each) in one backend call: every layer's samples
        become extra samples of one (L·n, R, f) batch, then each sample's L norms are summed."""
        weight, bias = modules[0].weight, modules[0].bias
        pairs = [self.rows(m, u, n) for m, u in zip(modules, uses)]
        A, G = torch.cat([a for a, _ in pairs]), torch.cat([g for _, g in pairs])
        w_sq, b_sq, path = backend.linear_sq_norms(A, G, with_bias=_trainable(bias))
        total = w_sq if _trainable(weight) else torch.zeros_like(w_sq)
        if b_sq is not None:
            total = total + b_sq
        return total.view(len(pairs), n).sum(dim=0), path

    def stacked_clipped_grads(self, modules, uses, n, coef) -> dict:
        """``clipped_grads`` of several same-shape Linears (one use each) with one batched GEMM for all of them.

        Same sums as layer by layer (only the GEMM batching differs); the caller bounds the stacked copies of
        A and G (see ``STACK_BYTES``). Used for the small per-layer GEMMs whose launch/Python cost dominates.
        """
        weight, bias = modules[0].weight, modules[0].bias
        clip = as_coefficients(coef)
        pairs = [self.rows(m, u, n) for m, u in zip(modules, uses)]
        A = torch.stack([a for a, _ in pairs])  # (L, n, R, d)
        G = torch.stack([g for _, g in pairs])  # (L, n, R, p)
        L, d, p = A.shape[0], A.shape[-1], G.shape[-1]
        grads = {}
        if _trainable(weight):
            dtype = A.dtype if A.dtype == G.dtype else matmul_dtype(A, G)
            # As clipped_grads: the smaller operand is scaled, by c in its own dtype; (n, 1, 1) broadcasts over L.
            if d <= p:
                lhs, rhs = G, A * clip.like(pairs[0][0])
            else:
                lhs, rhs = G * clip.like(pairs[0][1]), A
            gw = torch.bmm(lhs.reshape(L, -1, p).to(dtype).transpose(1, 2), rhs.reshape(L, -1, d).to(dtype))
            grads.update((m.weight, g.to(weight.dtype)) for m, g in zip(modules, gw.unbind(0)))
        if _trainable(bias):
            G3 = G.reshape(L, -1, p)
            gb = clip.per_row(G.shape[2], G3) @ G3  # (L, p)
            grads.update((m.bias, g.to(bias.dtype)) for m, g in zip(modules, gb.unbind(0)))
        return grads

    def stack_key(self, module, use) -> tuple | None:
        """Linears with equal keys can share ``stacked_sq_norms`` and ``stacked_clipped_grads``; None: this layer is
        normed and clipped on its own."""
        A, G = use.inputs[0], use.grad_output
        weight, bias = module.weight, module.bias
        if G is None or type(module) is not nn.Linear:
            return None
        return (
            A.shape, A.dtype, G.shape, G.dtype, A.device, _trainable(weight), weight.dtype,
            _trainable(bias), None if bias is None else bias.dtype,
        )  # fmt: skip


class EmbeddingRule:
    """nn.Embedding: per-sample gradient scatters G rows into the table rows they looked up."""

    name = "embedding"
    summary = "exact: G rows of equal indices interact; clipped gradient scattered into the table"
    refuses = "max_norm, scale_grad_by_freq, sparse"
    batch_dims = (0, 1)

    @staticmethod
    def supports(module: nn.Embedding) -> str | None:
        if module.max_norm is not None:
            return "max_norm renormalises looked-up rows in place during the forward"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq scales gradients by batch-wide counts, which mixes samples"
        if module.sparse:
            return "sparse gradients are not supported"
        return None

    def _rows(self, module, use, n):
        check_rows(use.inputs[0].shape[0], n)
        idx = use.inputs[0].reshape(n, -1)
        G = use.grad_output.reshape(n, idx.shape[1], -1)
        if module.padding_idx is not None:  # padding rows receive no gradient in nn.Embedding
            G = G * (idx != module.padding_idx).unsqueeze(-1).to(G.dtype)
        return idx, G

    def sq_norm(self, module, uses, n, backend) -> tuple[torch.Tensor, str]:
        pairs = [self._rows(module, u, n) for u in uses]
        if len(pairs) == 1:
            idx, G = pairs[0]
        else:
            idx, G = torch.cat([i for i, _ in pairs], dim=1), torch.cat([g for _, g in pairs], dim=1)
        G = G.to(backend.accumulate_dtype(uses[0].grad_output))
        same_row = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(G.dtype)
        return (torch.bmm(G, G.transpose(1, 2)) * same_row).sum(dim=(1, 2)), "embedding"

    def clipped_grads(self, module, uses, n, coef) -> dict:
        # A plain full-shape table even when the weight is an FSDP2 shard (DTensor): sharded modes reduce-scatter it.
        table = torch.zeros(module.weight.shape, dtype=module.weight.dtype, device=module.weight.device)
        clip = as_coefficients(coef)
        for use in uses:
            idx, G = self._rows(module, use, n)
            scaled = (G * clip.like(G)).reshape(-1, G.shape[-1])
            table.index_add_(0, idx.reshape(-1), scaled.to(table.dtype))
        return {module.weight: table}


LINEAR_RULE = LinearLikeRule()
