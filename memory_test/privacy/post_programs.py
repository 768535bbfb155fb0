"""Post-backward programs: the per-layer DP work of each repeated block as one compiled call, exactly.

After the compiled recording backward, the eager engine runs every layer's rule in Python: on DiT-XL/2 286 layers of
norms and clipped gradients, ~10 tensor operations each, issued one by one (at small batches that host work is the
step time). A program runs the same rules on the same (A, G) of one block, traced by Dynamo into one graph:

- ``sq_norms``: the block's per-sample squared norms, summed over its layers (layers sharing one input normed
  together, as the engine groups them: the flash Gram kernel then reads the input Gram once for q, k and v);
- ``clipped_grads`` (book-keeping modes): every layer's Σ_i c_i G_iᵀA_i, as the rules write them.

The flash kernels enter the graph as operators (``memory_test::flash_gram_norms``, ``flash_direct_norms``: their
launchers and tuning stay outside it); everything else (coefficient scaling, casts, GEMMs, the outer-path and
embedding norms) is compiled with the model's own compile settings. Blocks of one structure share one graph, as in
regional compilation: DiT-XL/2 has two (block 0's embedder also runs for the output layer), each compiled static
for the first batch size and once more with a dynamic batch dimension.

What a traced program cannot do is a Python side effect. Each structure's first call therefore runs eagerly: it
records the margin-ledger notes its norms make (the budgets that set the clip factor) and the norm paths, and every
compiled call replays them. The notes are keyed by everything they depend on (the layout, the operands' shapes but
the batch, dtypes, device, and the switches the norm code reads), so a change of any of these records them anew;
the same switches are arguments of the program, so Dynamo recompiles it as well.

Layers outside the repeated blocks (DiT: patch embedding and output layers), and rules not listed in
``PROGRAM_RULES``, keep the eager per-layer path. ``dp_model.compile(programs=False)`` turns programs off.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import nn

from memory_test.kernels import flash_norms, norm_error

from .compile_options import without_cuda_graphs
from .conv_rule import ConvRule
from .layer_rules import ClipCoefficients, EmbeddingRule, LinearLikeRule, Use
from .norm_rules import GroupNormRule, LayerNormRule, RMSNormRule

# The margin budgets are pure functions of dtypes and shapes behind functools.lru_cache; Dynamo traces them without
# their cache, which is right for them, and says so once per function.
warnings.filterwarnings(
    "ignore", message=r"Dynamo detected a call to a `functools.lru_cache`-wrapped function at 'norm_(error|backends)"
)

# Rules whose per-layer work is traced into programs (each exercised by tests/privacy/test_compile_programs.py).
PROGRAM_RULES = (LinearLikeRule, ConvRule, EmbeddingRule, LayerNormRule, RMSNormRule, GroupNormRule)


class Layout(NamedTuple):
    """What a program does with its operands: per layer its rule and the slots of its uses that got a gradient;
    the groups normed together (layer indices) and the layers normed alone. Plain tuples: Dynamo guards on them."""

    rules: tuple
    slots: tuple  # per layer, indices into the program's (inputs, grads) lists
    rows: tuple  # per slot, the rows its tensors hold per sample (K, the noise multiplicity, times any reuse)
    groups: tuple  # tuples of layer indices sharing one input, one use each
    singles: tuple  # layers normed on their own


def switches() -> tuple[bool, bool, bool, bool]:
    """Process switches the norm code reads while a program is traced; Dynamo does not guard environment variables,
    so they are passed to every program call (a change recompiles it)."""
    return (
        norm_error.margins_enabled(),
        flash_norms.tf32_rounding(),
        flash_norms._interpret(),
        bool(torch.backends.cuda.matmul.allow_tf32),
    )


def _use(inputs: list, grads: list, slot: int) -> Use:
    use = Use(inputs[slot])
    use.grad_output = grads[slot]
    return use


def _relate_rows(layout: Layout, inputs: list, grads: list, n: int) -> None:
    """Tell the compiler what the engine knows: each slot's tensors hold ``rows`` rows per sample. With a dynamic
    batch, the batch size and every tensor's first dimension are separate symbols otherwise, and each reshape to
    (n, rows, f) becomes a divisibility problem the compiler solves slowly and guards on."""
    for slot, rows in enumerate(layout.rows):
        torch._check(grads[slot].shape[0] == n * rows)
        x = inputs[slot][0]
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            torch._check(x.shape[0] == n * rows)


def region_sq_norms(layout: Layout, modules: list, inputs: list, grads: list, n: int, backend, flags: tuple):
    """(Σ over the region's layers of each sample's squared norm, the norm path of each layer in the order normed)."""
    if not all(isinstance(f, bool) for f in flags):  # read, so that Dynamo guards on every switch
        raise TypeError("program switches are booleans")
    _relate_rows(layout, inputs, grads, n)
    total, paths = None, []
    for members in layout.groups:
        uses = [_use(inputs, grads, layout.slots[i][0]) for i in members]
        results = layout.rules[members[0]].group_sq_norms([modules[i] for i in members], uses, n, backend)
        for sq, path in results:
            total = sq if total is None else total + sq
            paths.append(path)
    for i in layout.singles:
        uses = [_use(inputs, grads, s) for s in layout.slots[i]]
        sq, path = layout.rules[i].sq_norm(modules[i], uses, n, backend)
        total = sq if total is None else total + sq
        paths.append(path)
    return total, tuple(paths)


def region_clipped_grads(layout: Layout, modules: list, inputs: list, grads: list, n: int, coef: torch.Tensor):
    """Each layer's {parameter: Σ_i c_i g_i} (the rules' clipped gradients)."""
    _relate_rows(layout, inputs, grads, n)
    clip = ClipCoefficients(coef)
    return [
        layout.rules[i].clipped_grads(modules[i], [_use(inputs, grads, s) for s in slots], n, clip)
        for i, slots in enumerate(layout.slots)
        if slots
    ]


class _Step(NamedTuple):
    """One region's operands in one step (dropped once its clipped gradients are written)."""

    states: list
    layout: Layout
    modules: list
    inputs: list
    grads: list
    order: tuple  # the states in the order their norms come out of the program
    first: bool = False  # the first call of this structure (run eagerly, recording)


class Region:
    """The layers of one repeated block that programs handle."""

    def __init__(self, states: list):
        self.states = states
        self.step: _Step | None = None

    def gather(self, n: int) -> _Step | None:
        """This step's layout and operands (uses that got an output gradient), or None if no layer has one."""
        states, per_layer, inputs, grads = self.states, [[] for _ in self.states], [], []
        depth = max(len(s.uses) for s in states)
        # Use-major order: layers used more than once (block 0's embedder) put their later uses at the end, so
        # blocks of another structure still see the same shapes at the same positions (Dynamo's dynamic shapes).
        for k in range(depth):
            for i, state in enumerate(states):
                if k < len(state.uses) and state.uses[k].grad_output is not None:
                    per_layer[i].append(len(grads))
                    inputs.append(state.uses[k].inputs)
                    grads.append(state.uses[k].grad_output)
        if not grads:
            return None
        groups, grouped = self._groups(per_layer)
        singles = tuple(i for i, slots in enumerate(per_layer) if slots and i not in grouped)
        rows = tuple(g.shape[0] // n for g in grads)
        layout = Layout(tuple(s.rule for s in states), tuple(map(tuple, per_layer)), rows, groups, singles)
        order = tuple(states[i] for g in groups for i in g) + tuple(states[i] for i in singles)
        modules = [s.module for s in states]
        return _Step(states, layout, modules, inputs, grads, order)

    def _groups(self, per_layer) -> tuple[tuple, set]:
        """Groups as the engine forms them (``_finish_layer``): every member in this region, used once, with its
        gradient; any other group's members are normed alone (the same sums, without the shared input Gram)."""
        index = {id(s): i for i, s in enumerate(self.states)}
        groups, grouped = [], set()
        for state in self.states:
            group = state.group
            if group is None or len(group.members) < 2 or id(group.members[0]) != id(state):
                continue
            members = [index.get(id(m)) for m in group.members]
            if any(i is None or len(self.states[i].uses) != 1 or len(per_layer[i]) != 1 for i in members):
                continue
            groups.append(tuple(members))
            grouped.update(members)
        return tuple(groups), grouped


# Regions normed by one call hold at most this many bytes of stacked operand copies (a transient: the copies are
# freed when the call returns). DiT-XL/2: every block at B=2, three at B=8 in bf16, none from B=32 on.
PROGRAM_STACK_BYTES = 256 << 20


def _operand_bytes(step: _Step) -> int:
    return sum(t.nbytes for use in step.inputs for t in use) + sum(g.nbytes for g in step.grads)


# Layer types whose regions may be stacked, and the attributes their rules read besides parameters and operands.
STACK_ATTRIBUTES = {nn.Linear: (), nn.Embedding: ("padding_idx",)}


def _stack_signature(step: _Step, n: int) -> tuple | None:
    """What a stacked call takes from the first region for all: layers of STACK_ATTRIBUTES' exact types with equal
    attributes, whose parameters match in shape, dtype and requires_grad (a frozen weight in one block must not be
    normed as trainable, or the reverse).
    None: the region is normed alone (another layer type, whose attributes the rules read; or an operand that does
    not hold its slot's rows per sample in dimension 0, where regions concatenate)."""
    rows = step.layout.rows
    for slot, use in enumerate(step.inputs):
        for t in (*use, step.grads[slot]):
            if not (isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows[slot] * n):
                return None
    if any(type(m) not in STACK_ATTRIBUTES for m in step.modules):
        return None
    return tuple(
        (
            tuple((name, p.shape, p.dtype, p.requires_grad) for name, p in m.named_parameters(recurse=False)),
            tuple(getattr(m, attr) for attr in STACK_ATTRIBUTES[type(m)]),
        )
        for m in step.modules
    )


def stack_runs(steps: list, keys: list, n: int) -> list[list[int]]:
    """Indices of consecutive steps normed by one call: equal recording keys (same structure and operand shapes)
    and equal stack signatures (``_stack_signature``), at most PROGRAM_STACK_BYTES of operands together. A step
    that is None (no gradient) is in no run."""
    runs, size, signature = [], 0, None
    for i, step in enumerate(steps):
        if step is None:
            continue
        nbytes, mine = _operand_bytes(step), _stack_signature(step, n)
        fits = runs and keys[runs[-1][-1]] == keys[i] and size + nbytes <= PROGRAM_STACK_BYTES
        if fits and runs[-1][-1] == i - 1 and mine is not None and mine == signature:
            runs[-1].append(i)
            size += nbytes
        else:
            runs.append([i])
            size, signature = nbytes, mine
    return runs


def stacked_operands(run: list) -> tuple[list, list]:
    """(inputs, grads) of a run's regions, each slot's tensors concatenated region after region: region r's sample i
    becomes sample r·n + i of one batch (every rule is per sample, so its norm is unchanged)."""
    inputs = [tuple(torch.cat(parts) for parts in zip(*uses)) for uses in zip(*(st.inputs for st in run))]
    grads = [torch.cat(parts) for parts in zip(*(st.grads for st in run))]
    return inputs, grads


class PostPrograms:
    """The programs of one compiled DP model: its regions, the compiled functions, the recorded notes."""

    def __init__(self, regions: list[list], compile_kwargs: dict):
        self.regions = [Region(states) for states in regions if states]
        self.states = {id(s) for region in self.regions for s in region.states}
        kwargs = {k: v for k, v in compile_kwargs.items() if k != "fullgraph"}
        # Under CUDA graphs the norms program replays too: its output is added to the step's norms at once. The
        # clipped gradients become p.grad, which must outlive the graphs' next replay: that program runs without.
        self._sq_norms = torch.compile(region_sq_norms, fullgraph=True, **kwargs)
        self._clipped_grads = torch.compile(region_clipped_grads, fullgraph=True, **without_cuda_graphs(kwargs))
        self._notes: dict = {}  # recording key -> (ledger notes, norm paths)
        self.status = "compiled"  # or "eager: <why>" after a compile failure (see _run)

    @classmethod
    def for_model(cls, states: list, blocks: list[nn.Module], compile_kwargs: dict) -> PostPrograms | None:
        """Programs for the layers inside ``blocks`` whose rules are traceable; None when there are none."""
        owner = {id(sub): b for b, block in enumerate(blocks) for sub in block.modules()}
        regions: list[list] = [[] for _ in blocks]
        for state in states:
            b = owner.get(id(state.module))
            if b is not None and type(state.rule) in PROGRAM_RULES:
                regions[b].append(state)
        programs = cls(regions, compile_kwargs)
        return programs if programs.regions else None

    # ----- per step ------------------------------------------------------------------------------------------
    def add_sq_norms(self, gsm) -> None:
        """Every region's norms into ``gsm._sq_norm``; its layers are then done (released unless book-keeping).

        Consecutive regions of one structure are normed by one call, their samples stacked as extra samples (see
        ``stack_runs``): the same program, exact, with one call's host cost instead of one per block."""
        n, backend, flags = gsm._n, gsm.norm_backend, switches()
        steps = [region.gather(n) for region in self.regions]
        keys = [self._record_key(st, n, flags) if st else None for st in steps]
        for run in stack_runs(steps, keys, n):
            first = self._run_norms(gsm, [steps[i] for i in run], keys[run[0]], n, backend, flags)
            for i in run:
                steps[i] = steps[i]._replace(first=first)
        for region, step in zip(self.regions, steps):
            for state in region.states:
                state.pending = 0
                gsm._done(state)
            region.step = step if gsm.keep_for_bookkeeping else None

    def _run_norms(self, gsm, run: list, key: tuple, n: int, backend, flags) -> bool:
        """One norms call for a run of same-structure regions (``key``: their recording key); returns whether it was
        the structure's first."""
        head, k = run[0], len(run)
        inputs, grads = (head.inputs, head.grads) if k == 1 else stacked_operands(run)
        args = (head.layout, head.modules, inputs, grads, k * n, backend, flags)
        total, paths, first = self._norms(key, args, backend)
        backend.replay(self._notes[key][0] * (k - 1))  # the ledger counts one call per region, as unstacked
        gsm._sq_norm.add_(total.reshape(k, n).sum(dim=0) if k > 1 else total)
        for step in run:
            gsm.norm_paths.update(zip((s.name for s in step.order), paths))
        return first

    def write_clipped_grads(self, gsm, coef: torch.Tensor) -> None:
        """Every region's clipped gradients into p.grad; its layers' operands are released."""
        for region in self.regions:
            step, region.step = region.step, None
            if step is not None:
                args = (step.layout, step.modules, step.inputs, step.grads, gsm._n, coef)
                run = region_clipped_grads if step.first else self._clipped_grads  # compiled from the second call on
                for grads in self._run(run, region_clipped_grads, args):
                    gsm._write_grads(grads)
            for state in region.states:
                gsm._release(state)

    def forget_step(self) -> None:
        for region in self.regions:
            region.step = None

    # ----- internals -------------------------------------------------------------------------------------------
    def _norms(self, key, args, backend):
        recorded = self._notes.get(key)
        if recorded is None:  # first call of this structure: eager, recording what the traced calls cannot do
            with backend.recording() as notes:
                total, paths = region_sq_norms(*args)
            self._notes[key] = (notes, paths)
            return total, paths, True
        notes, paths = recorded
        noted = backend.noted
        total, _ = self._run(self._sq_norms, region_sq_norms, args)
        if backend.noted == noted:  # the compiled graph ran (an eager fallback notes by itself)
            backend.replay(notes)
        return total, paths, False

    def _run(self, compiled, eager, args):
        """The compiled program; if Dynamo or the backend cannot compile it, the eager one from then on (warned, and
        ``status`` says why: the result is the same, only slower)."""
        if self.status == "compiled":
            try:
                return compiled(*args)
            except torch._dynamo.exc.TorchDynamoException as e:
                self.status = f"eager: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"post-backward programs run eagerly: {self.status}", stacklevel=3)
        return eager(*args)

    @staticmethod
    def _record_key(step: _Step, n: int, flags: tuple) -> tuple:
        """Everything the ledger notes depend on: layout (rows per sample included), operand shapes but the batch,
        dtypes, device, switches."""
        meta = tuple(
            (t.shape[1:], t.dtype) for use_inputs in step.inputs for t in use_inputs if isinstance(t, torch.Tensor)
        )
        grads = tuple((g.shape[1:], g.dtype) for g in step.grads)
        return step.layout, meta, grads, step.grads[0].device, flags
