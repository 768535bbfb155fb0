"""Which dimension of each layer's tensors holds the samples, verified once by permuting the batch.

The rules regroup a layer's rows as ``(n, rows_per_sample, f)``. That is only right if the rows of sample i form
one contiguous block of the batch dimension. Shapes cannot tell: a sequence-first layer ``(T, N, f)`` with T a
multiple of N, or a batch-independent ``(T, f)`` input, divide just as well. So, before the first recorded
forward, the model runs without gradient, in eval mode, on the whole batch: once as given and once with its rows
permuted by each of two permutations, an R-cycle (every row moves) and a transposition of rows 0 and 1. In every
layer, the dimension that holds the samples permutes the same way; any other dimension does not. One permutation is
not enough: a model that itself permutes the batch (``x.roll(1, 0)``) commutes with a cycle and would pass; the two
permutations generate every permutation of the R rows (whose centre is trivial for R >= 3), so only a model that
keeps each row in place passes both, and a model that mixes rows (row i into row i + 3) changes under the
transposition. A layer whose tensors permute along dimension 0 (or 1, for sequence-first layers whose rule allows
it) gets that batch dimension; a layer that permutes along neither is refused. Eval mode keeps dropout and other
randomness out of the comparison (it changes statistics, not which rows belong to which sample).

Why the whole batch and not a few rows: a model may reorder or mix rows only beyond the rows probed, or only for
batches of its size (``if x.shape[0] > 3``); the probe sees the batch the model is trained on, every row of it. Its
cost is three no-grad forwards of that batch, once per model (about one non-private step: a backward costs about
two forwards). Two exceptions, both forced: rows whose inputs are NaN or infinite are left out (they would fail
every comparison; the model then runs on the finite rows only), and a batch of two rows is probed as three,
(a, b, a), since no permutation of two rows tells a model that swaps them from one that does not. What no
permutation can tell: a mixing that treats every row alike (``x - x.mean(0)``, BatchNorm's batch statistics,
refused by name elsewhere) commutes with every permutation.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import LayoutError

PROBE_FORWARDS = 3  # the batch as given and under each of the two permutations
FINGERPRINT_CHUNK = 1 << 22  # float64 elements made at a time by a fingerprint (32 MiB), whatever the batch


def probe_rows(finite: list[int]) -> list[int]:
    """The rows the probe runs, in batch order: every finite row; two rows as (a, b, a) (see the module doc)."""
    return [finite[0], finite[1], finite[0]] if len(finite) == 2 else list(finite)


def check_permutations(m: int) -> tuple[list[int], list[int]]:
    """An m-cycle and the transposition of rows 0 and 1 (row i of the permuted batch is row perm[i]): together
    they generate every permutation of m rows, and for m >= 3 only the identity commutes with both."""
    return [*range(1, m), 0], [1, 0, *range(2, m)]


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
    """{dim: (per-row weighted sums, per-row scale, dtype)} for each dim in (0, 1) that can hold the m probe rows."""
    out = {}
    for dim in (0, 1):
        if t.dim() <= dim or t.shape[dim] % m or t.numel() == 0:
            continue
        out[dim] = (*_weighted_sums(t.detach().movedim(dim, 0).reshape(m, -1)), t.dtype)
    return out


def _weighted_sums(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows @ w, |rows| @ w) in float64 for fixed random weights w in [0.5, 1.5) seeded by the row length, converted
    FINGERPRINT_CHUNK elements at a time: a float64 copy of a whole layer's activations would not be small."""
    m, width = rows.shape
    gen = torch.Generator(device=rows.device).manual_seed(width)
    w = torch.rand(width, generator=gen, device=rows.device, dtype=torch.float64) + 0.5
    sums = torch.zeros(m, dtype=torch.float64, device=rows.device)
    scale = torch.zeros_like(sums)
    step = max(1, FINGERPRINT_CHUNK // m)
    for lo in range(0, width, step):
        part = rows[:, lo : lo + step].to(torch.float64)
        sums += part @ w[lo : lo + step]
        scale += part.abs() @ w[lo : lo + step]
    return sums, scale


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
        pick = probe_rows(finite)
        m = len(pick)
        ref = self._forward(gsm, args, kwargs, rows, pick, m)
        gots = [(p, self._forward(gsm, args, kwargs, rows, [pick[i] for i in p], m)) for p in check_permutations(m)]
        for state in self.states:
            state.batch_dim = self._batch_dim(state, ref.get(state), [(perm, got.get(state)) for perm, got in gots])
        self.pending = False

    def _probe(self, gsm, args, kwargs, rows, pick) -> None:
        """The forwards of a check whose result is not used (keeps sharded ranks in step)."""
        for _ in range(PROBE_FORWARDS):
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
                f"the engine's layout check (the model run without gradient, in eval mode, on {m} rows of the batch, "
                f"reordered: every tensor argument with {rows} rows indexed) failed with {type(exc).__name__}: "
                f"{exc}. Pass per-row inputs with the batch in dimension 0 and everything else without it."
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
