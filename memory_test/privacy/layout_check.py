"""Which dimension of each layer's tensors holds the samples, verified once by permuting the batch.

The rules regroup a layer's rows as ``(n, rows_per_sample, f)``. That is only right if the rows of sample i form
one contiguous block of the batch dimension. Shapes cannot tell: a sequence-first layer ``(T, N, f)`` with T a
multiple of N, or a batch-independent ``(T, f)`` input, divide just as well. So, before the first recorded
forward, the model runs without gradient, in eval mode, on three rows of the real batch: once as given and once with
those rows permuted by each of two permutations, a 3-cycle and a transposition. In every layer, the dimension that
holds the samples permutes the same way; any other dimension does not. One permutation is not enough: a model that
itself permutes the batch (``x.roll(1, 0)``) commutes with a cycle and would pass; the two permutations generate
every permutation of three rows, so only a model that keeps each row in place passes both. A layer whose tensors
permute along dimension 0 (or 1, for sequence-first layers whose rule allows it) gets that batch dimension; a layer
that permutes along neither is refused. Eval mode keeps dropout and other randomness out of the comparison (it
changes statistics, not which rows belong to which sample).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import LayoutError

CHECK_ROWS = 3  # rows of the real batch used by the check (repeated when the batch has only two finite rows)
# A 3-cycle and a transposition: together they generate S_3, whose centre is trivial, so a model permutation of
# the rows that commutes with both is the identity.
CHECK_PERMUTATIONS = ([1, 2, 0], [1, 0, 2])


def batch_rows(args, kwargs) -> int:
    """R, the number of rows of the batch: dimension 0 of the forward's first tensor argument with a dimension."""
    leaves, _ = tree_flatten((args, kwargs))
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    raise LayoutError("the model's forward got no tensor argument with a batch dimension; pass the batch as a tensor")


def _per_row(x, rows: int) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == rows


def _finite_rows(args, kwargs, rows: int) -> list[int]:
    """Rows whose floating-point inputs are all finite (a NaN row would make every comparison fail)."""
    ok = torch.ones(rows, dtype=torch.bool)
    for leaf in tree_flatten((args, kwargs))[0]:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dim() and leaf.shape[0] == rows:
            ok &= torch.isfinite(leaf.detach().reshape(rows, -1)).all(dim=1).cpu()
    return ok.nonzero().flatten().tolist()


def _fingerprint(t: torch.Tensor, m: int) -> dict:
    """{dim: (per-row weighted sums, per-row scale)} for each dim in (0, 1) that can hold the m check rows."""
    out = {}
    for dim in (0, 1):
        if t.dim() <= dim or t.shape[dim] % m or t.numel() == 0:
            continue
        rows = t.detach().movedim(dim, 0).reshape(m, -1).to(torch.float64)
        gen = torch.Generator(device=rows.device).manual_seed(rows.shape[1])
        w = torch.rand(rows.shape[1], generator=gen, device=rows.device, dtype=torch.float64) + 0.5
        out[dim] = (rows @ w, rows.abs() @ w, t.dtype)
    return out


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)


class LayoutCheck:
    """Runs the permutation check and stores each layer's batch dimension on its state (``state.batch_dim``)."""

    def __init__(self, states):
        self.states = states
        self.pending = True

    def run(self, gsm, args, kwargs, rows: int, *, always_forward: bool = False) -> None:
        """Verify every layer's batch dimension on this batch, or leave ``pending`` if it has too few rows.

        ``always_forward``: run the two probe forwards even when this batch cannot be checked (sharded models:
        every rank must run the same forwards, since each one all-gathers parameters).
        """
        finite = _finite_rows(args, kwargs, rows) if rows >= 2 else list(range(rows))
        if rows >= 2 and len(finite) < 2:
            if always_forward:
                self._probe(gsm, args, kwargs, rows, finite[:1])
            raise LayoutError(
                "the engine's layout check needs two rows of the first batch whose inputs are all finite; "
                f"{rows - len(finite)} of its {rows} rows hold NaN or infinity. Check the data."
            )
        if rows < 2:  # one row is one sample whatever the layout: nothing to check yet, nothing can be wrong
            if always_forward:
                self._probe(gsm, args, kwargs, rows, finite)
            return
        m = CHECK_ROWS
        if len(finite) >= m:
            spread = torch.linspace(0, len(finite) - 1, m).round().long().tolist()  # first, middle, last finite rows
            pick = [finite[i] for i in spread]
        else:  # two finite rows: (a, b, a) still tells every row permutation of the model from the identity
            pick = [finite[i % len(finite)] for i in range(m)]
        ref = self._forward(gsm, args, kwargs, rows, pick, m)
        gots = [(p, self._forward(gsm, args, kwargs, rows, [pick[i] for i in p], m)) for p in CHECK_PERMUTATIONS]
        for state in self.states:
            state.batch_dim = self._batch_dim(state, ref.get(state), [(perm, got.get(state)) for perm, got in gots])
        self.pending = False

    def _probe(self, gsm, args, kwargs, rows, pick) -> None:
        """The forwards of a check whose result is not used (keeps sharded ranks in step)."""
        for _ in range(1 + len(CHECK_PERMUTATIONS)):
            self._forward(gsm, args, kwargs, rows, pick, max(1, len(pick)))

    def _forward(self, gsm, args, kwargs, rows, pick, m) -> dict:
        leaves, spec = tree_flatten((args, kwargs))
        index = torch.tensor(pick, dtype=torch.long)
        sub = [x.index_select(0, index.to(x.device)) if _per_row(x, rows) else x for x in leaves]
        sub_args, sub_kwargs = tree_unflatten(sub, spec)
        seen: dict = {}
        handles = [s.module.register_forward_hook(self._recorder(s, seen, m)) for s in self.states]
        modes = {mod: mod.training for mod in gsm._module.modules()}
        try:
            gsm._module.eval()
            # Eager even inside compiled regions: probes must not compile eval/no-grad graphs of their own.
            with torch.no_grad(), gsm.hooks_off(), torch.compiler.set_stance("force_eager"):
                gsm._module(*sub_args, **sub_kwargs)
        except Exception as exc:
            raise LayoutError(
                f"the engine's layout check (the model run without gradient, in eval mode, on {m} rows of the batch: "
                f"every tensor argument with {rows} rows sliced) failed with {type(exc).__name__}: {exc}. Pass "
                "per-row inputs with the batch in dimension 0 and everything else without it."
            ) from exc
        finally:
            for h in handles:
                h.remove()
            for mod, training in modes.items():
                mod.training = training
        return seen

    @staticmethod
    def _recorder(state, seen, m):
        def hook(module, inputs, output):
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            prints = [_fingerprint(t, m) for t in (x, output) if isinstance(t, torch.Tensor)]
            seen.setdefault(state, []).append(prints)

        return hook

    def _batch_dim(self, state, ref, gots: list) -> int | None:
        """The dim along which every tensor of every use permutes with the batch under every check permutation, or
        None (not seen by the check). ``gots``: (permutation, what the layer saw on the permuted rows)."""
        if ref is None or any(got is None or len(ref) != len(got) for _, got in gots):
            return None
        allowed = getattr(state.rule, "batch_dims", (0,))
        for dim in allowed:
            pairs = [(r, g, perm) for perm, got in gots for ru, gu in zip(ref, got) for r, g in zip(ru, gu)]
            if all(self._permutes(r, g, dim, perm) for r, g, perm in pairs):
                return dim
        raise LayoutError(
            f"{state.name} ({type(state.module).__name__}): its rows do not follow the batch along dimension "
            + " or ".join(map(str, allowed))
            + ". Per-sample clipping needs every tensor this layer sees to hold each sample's rows in one block of "
            "its batch dimension; a batch-independent input (e.g. a table applied to every sample) or another layout "
            "would be regrouped wrongly. Apply the layer per sample (broadcast over a batch dimension) or freeze it."
        )

    @staticmethod
    def _permutes(ref: dict, got: dict, dim: int, perm: list) -> bool:
        if dim not in ref or dim not in got:
            return False
        (rv, rs, dtype), (gv, gs, _) = ref[dim], got[dim]
        expect = rv[perm]
        tol = _tolerance(dtype) if dtype.is_floating_point else 0.0
        return bool(((gv - expect).abs() <= tol * (rs[perm] + gs) + 1e-300).all())
