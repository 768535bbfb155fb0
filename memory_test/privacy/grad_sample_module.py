"""The wrapped model: captures each trainable layer's input and output gradient, computes exact per-sample norms.

How one backward avoids the unclipped weight gradients: every trainable module's output passes through a
``_Tap`` autograd node that also takes a scalar ``anchor`` leaf. The recording backward is
``torch.autograd.grad(sum_i loss_i, anchor)``: autograd then runs only nodes on a path to the anchor, so
activation gradients flow (every tap is on such a path) but no parameter's AccumulateGrad is reached and the
weight-gradient GEMMs are skipped by autograd itself (``needs_input_grad`` is False for those edges).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.nn as nn
from opacus.grad_sample.gsm_base import AbstractGradSampleModule

from .coverage import uncovered_parameters
from .errors import (
    SPENT_FORWARD,
    CoverageError,
    CriterionError,
    LayoutError,
    PrivacyConfigError,
    SharedParameterError,
    UnsupportedLayerError,
)
from .layer_rules import LINEAR_RULE, ClipCoefficients, LinearLikeRule, Use
from .layout_check import LayoutCheck, batch_rows
from .rules import lookup, supported_layer_names
from .stats import EngineStats
from .step_cache import StepCache
from .step_health import StepHealth


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output gradient to the engine."""

    @staticmethod
    def forward(ctx, output, anchor, gsm, state, use):
        ctx.gsm, ctx.state, ctx.use = gsm, state, use
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.gsm._recording_backward:
            return grad, None, None, None, None
        ctx.gsm._on_grad_output(ctx.state, ctx.use, grad)
        # No gradient for the anchor: the taps only need to lie on a path to it, and 286 zero scalars would cost
        # an allocation and an accumulation each.
        return grad, None, None, None, None


_dynamo_tracing = torch.compiler.is_dynamo_compiling  # False when run, True while Dynamo traces; ~80 ns a call


@torch.compiler.disable
def _untraced(fn, *args):
    """Run a hook eagerly when torch.compile traces the model (``torch.compile(dp_model)``, a model compiled before
    ``make_private``): Dynamo would otherwise trace ``_Tap``'s backward once, with ``_recording_backward`` False, as a
    plain identity, and the norms would silently miss every layer. A graph break per tap keeps the update exact;
    ``dp_model.compile()`` is the compiled path (memory_test.privacy.compiled)."""
    return fn(*args)


# Book-keeping norms and clips same-shape single-use Linears (one per block) together, in runs whose stacked A and G
# copies (and ghost's Grams) stay under this many bytes: at small batches their per-layer calls are host-bound.
STACK_BYTES = 32 << 20

# Layers whose matmul autocast runs in lower precision: their input is cast before the layer (see _cast_input).
_AUTOCAST_LOWERED = (nn.Linear, nn.Conv1d, nn.Conv2d)


class _LayerState:
    """Bookkeeping for one trainable module across the uses of one forward."""

    def __init__(self, name: str, module: nn.Module, rule):
        self.name, self.module, self.rule = name, module, rule
        self.uses: list[Use] = []
        self.pending = 0  # uses whose output gradient has not arrived yet
        self.done = False
        self.group = None  # InputGroup when this Linear shares its input with others (q, k, v)
        self.groupable = type(rule) is LinearLikeRule
        self.batch_dim: int | None = None  # set by the layout check; None: not verified (yet)
        self._own_params = list(module.parameters(recurse=False))  # looked up once, not per step

    def params(self):
        return [p for p in self._own_params if p.requires_grad]


def autocast_target(x) -> torch.dtype | None:
    """The dtype autocast would run a lowered layer (Linear, conv) in on ``x``, or None when it would not cast
    (not a floating tensor, autocast off on its device, already that dtype, or float64, which autocast keeps)."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        return None
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return None if x.dtype in (dtype, torch.float64) else dtype


def _owner_of_alias(modules: set, names: dict) -> set:
    """The module that owns a parameter also registered on its ancestors (Opacus' DPLSTM re-registers its cells'
    RNNLinear weights under nn.LSTM's names): the descendant, which computes with it. Any use of the parameter
    outside that module's forward is refused by the coverage walk, so the aliases need no rule. Otherwise (a tie
    between modules that are not ancestor and descendant) the set as given."""
    deepest = max(modules, key=lambda mod: len(names[mod]))
    path = names[deepest]
    ancestors = [mod for mod in modules if mod is not deepest]
    if all(names[mod] == "" or path.startswith(names[mod] + ".") for mod in ancestors):
        return {deepest}
    return modules


class DPGradSampleModule(AbstractGradSampleModule):
    """GradSampleModule for this package's modes: exact per-sample norms, two-pass or book-keeping clipping."""

    def __init__(
        self,
        m: nn.Module,
        *,
        norm_backend,
        keep_for_bookkeeping: bool,
        batch_first=True,
        loss_reduction="mean",
        max_grad_norm=1.0,
    ):
        if not batch_first:
            raise ValueError("memory_test.privacy modes need batch_first=True (the batch is dimension 0)")
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction)
        self.max_grad_norm = max_grad_norm
        self.norm_backend = norm_backend
        self.keep_for_bookkeeping = keep_for_bookkeeping
        self._anchor = torch.zeros((), requires_grad=True)
        self._recording_backward = False
        self._states = self._build_states(m)
        self._handles = [s.module.register_forward_hook(self._make_forward_hook(s)) for s in self._states]
        self._handles += [
            s.module.register_forward_pre_hook(self._cast_input)
            for s in self._states
            if type(s.module) in _AUTOCAST_LOWERED
        ]
        self.norm_paths: dict[str, str] = {}
        self._cache = StepCache()
        self._sq_norm: torch.Tensor | None = None
        self._n = 0
        self._per_sample_gradient_norms = None
        self._rows: int | None = None  # R: rows of the batch of the latest recorded forward
        self._in_backward = False
        self._layout = LayoutCheck(self._states)
        self.step_health = StepHealth()  # read by the optimizer before it noises and steps
        self._params = dict(m.named_parameters())
        self._trainable = self._trainable_flags()
        self._owner = {id(p): s for s in self._states for p in s._own_params}
        self._param_names = {id(p): name for name, p in self._params.items()}
        self._batch_norms = [
            (n, mod)
            for n, mod in m.named_modules()
            if isinstance(mod, nn.modules.batchnorm._NormBase)
            and not isinstance(mod, nn.modules.instancenorm._InstanceNorm)
        ]
        self._covered_structure = None  # use counts of the last forward whose graph passed the coverage walk
        # Kept through compile() (which replaces _handles): autograd writing p.grad outside the DP backward.
        self._grad_hooks = [
            p.register_post_accumulate_grad_hook(self._on_accumulated_grad)
            for s in self._states
            for p in s._own_params
            if p.requires_grad
        ]

    # ----- set-up -------------------------------------------------------------------------------------------
    @staticmethod
    def _build_states(m: nn.Module) -> list[_LayerState]:
        owners = defaultdict(set)
        names = {}
        for name, module in m.named_modules(remove_duplicate=False):
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    owners[p].add(module)
                    names.setdefault(module, name)
        for p in [p for p, mods in owners.items() if len(mods) > 1]:
            owners[p] = _owner_of_alias(owners[p], names)
        names = {mod: name for mod, name in names.items() if any(mod in mods for mods in owners.values())}
        shared = [p for p, mods in owners.items() if len(mods) > 1]
        if shared:
            held_by = sorted({names[mod] for p in shared for mod in owners[p]})
            raise SharedParameterError(
                f"{len(shared)} trainable parameter(s) are shared between different modules ({', '.join(held_by)}). "
                "Per-sample norms of tied parameters across module types are not supported: reuse the same module "
                "object instead (reuse is supported exactly), or freeze the tied parameter."
            )
        states, unsupported = [], []
        for module, name in names.items():
            rule, why = lookup(module)
            if rule is None:
                unsupported.append(f"{name or '<root>'} ({why})")
            else:
                states.append(_LayerState(name, module, rule))
        if unsupported:
            raise UnsupportedLayerError(
                "these trainable layers have no exact per-sample clipping rule: "
                + "; ".join(unsupported)
                + ". Freeze them (requires_grad_(False)) or replace them with supported layers ("
                + ", ".join(supported_layer_names())
                + "); trainable parameters held directly by a container module are not supported."
            )
        return states

    def _trainable_flags(self) -> tuple:
        return tuple(p.requires_grad for p in self._params.values())

    def _on_accumulated_grad(self, param: torch.Tensor) -> None:
        """Autograd accumulated into p.grad: only the two-pass modes' second backward may (the recording backward
        reaches no parameter; book-keeping writes p.grad itself). Anything else is an unclipped gradient."""
        if not self._in_backward:
            self.step_health.note_foreign_gradient(self._param_names[id(param)])

    # ----- forward ------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and self.hooks_enabled:
            self._before_recorded_forward(args, kwargs)
        return self._module(*args, **kwargs)

    @torch.compiler.disable  # checks and probe forwards: plain Python, never traced
    def _before_recorded_forward(self, args, kwargs) -> int:
        """Per recorded forward: no batch statistics, the batch's rows R, and (once) the layout check."""
        self._check_no_batch_statistics()
        self._rows = rows = batch_rows(args, kwargs)
        self._run_layout_check(args, kwargs, rows)
        return rows

    def _run_layout_check(self, args, kwargs, rows: int) -> None:
        if self._layout.pending:
            self._layout.run(self, args, kwargs, rows)

    def _check_no_batch_statistics(self) -> None:
        """BatchNorm normalising with batch statistics mixes samples (frozen or not): no per-sample gradient."""
        mixing = [name for name, m in self._batch_norms if m.training or not m.track_running_stats]
        if mixing:
            raise PrivacyConfigError(
                f"{', '.join(mixing)} normalise with batch statistics, which mixes samples: per-sample gradients "
                "do not exist. Replace BatchNorm with GroupNorm (opacus.validators.ModuleValidator.fix), or put it "
                "in eval mode with running statistics."
            )

    @contextmanager
    def hooks_off(self):
        """Run the model with the DP hooks disabled (the layout check's probe forwards)."""
        previous, self.hooks_enabled = self.hooks_enabled, False
        try:
            yield
        finally:
            self.hooks_enabled = previous

    def _make_forward_hook(self, state: _LayerState):
        def hook(module, inputs, output):
            if _dynamo_tracing():  # a traced tap loses its backward: see _untraced
                return _untraced(hook, module, inputs, output)
            # Recorded whatever module.training says: eval changes dropout and statistics, not who gets gradient.
            if not (torch.is_grad_enabled() and self.hooks_enabled):
                return None
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"{state.name}: DP taps need a tensor output, got {type(output).__name__}")
            if not inputs:
                raise PrivacyConfigError(keyword_only_call(state.name))
            if self._in_backward:
                # Non-reentrant activation checkpointing recomputes saved tensors here; gradients still flow through
                # the original forward's taps. (Reentrant checkpointing is refused by the coverage walk.)
                return None
            bd = self._batch_dim(state, inputs[0])
            use = Use(tuple(_sample_first(x.detach(), bd) if i == 0 else _detach(x) for i, x in enumerate(inputs)))
            use.batch_dim = bd
            use.held = self._cache.hold(use.tensors())
            state.uses.append(use)
            state.pending += 1
            if state.groupable and state.group is None:
                state.group = self._cache.group_for(inputs[0], state)
            tapped = _Tap.apply(output, self._anchor, self, state, use)
            _mark_boundary(use, inputs, tapped.grad_fn)
            return tapped

        return hook

    def _batch_dim(self, state: _LayerState, x) -> int:
        """The layer's verified batch dimension; its size must hold whole rows of every one of the R batch rows."""
        bd = state.batch_dim
        rows = self._rows
        if rows is None:
            raise PrivacyConfigError(
                f"{state.name} ran with DP hooks outside the wrapped model's forward: call the model that "
                "make_private returned, not its inner module"
            )
        if rows <= 1:
            return bd or 0  # no rows, or one row that is one sample: every grouping of the rows is the right one
        if bd is None:
            raise LayoutError(
                f"{state.name} ({type(state.module).__name__}) was not run by the engine's layout check (the model "
                "in eval mode on a few rows of the first batch), so which rows belong to which sample is unverified. "
                "A trainable layer that runs only in training mode or only for some inputs is not supported; freeze it."
            )
        if isinstance(x, torch.Tensor) and (x.dim() <= bd or x.shape[bd] % rows):
            size = "no batch dimension" if x.dim() <= bd else f"{x.shape[bd]} rows in dimension {bd}"
            raise LayoutError(
                f"{state.name} ({type(state.module).__name__}) got {size}, not a multiple of the batch's {rows} "
                "rows: its input does not carry the batch, so its rows cannot be assigned to samples"
            )
        return bd

    def _cast_input(self, module, inputs):
        """Under autocast, cast a Linear/Conv2d input to the autocast dtype before the layer, not inside it.

        The math is identical (autocast casts it anyway), but autograd now saves the very tensor book-keeping
        caches instead of BK holding the fp32 input beside autograd's copy, and q, k, v share one cast.
        """
        if _dynamo_tracing():  # its id()-keyed cache is per step: see _untraced
            return _untraced(self._cast_input, module, inputs)
        x = inputs[0] if inputs else None
        dtype = autocast_target(x) if self.hooks_enabled else None
        return None if dtype is None else (self._cache.cast(x, dtype), *inputs[1:])

    hooks_enabled = True

    def compile(self, *args, **kwargs) -> None:
        """torch.compile this DP model in place, exactly (as nn.Module.compile): see memory_test.privacy.compiled."""
        from .compiled import compile_private

        compile_private(self, *args, **kwargs)

    def enable_hooks(self):
        self.hooks_enabled = True

    def disable_hooks(self):
        self.hooks_enabled = False

    def remove_hooks(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    # ----- backward-time work --------------------------------------------------------------------------------
    @property
    def dp_cache_peak_bytes(self) -> int:
        """Peak bytes of storage referenced by the engine's caches (layer inputs and output gradients).

        Inputs are the tensors autograd also saves while backward runs; book-keeping keeps them, and the output
        gradients, until every norm is known.
        """
        return self._cache.peak_bytes

    def reset_dp_cache_peak(self) -> None:
        """Restart the peak from what the caches hold now (e.g. after warm-up steps)."""
        self._cache.peak_bytes = self._cache.bytes

    def _on_grad_output(self, state: _LayerState, use: Use, grad: torch.Tensor):
        if not use.inputs:  # released by an earlier backward: where torch's own second-backward error cannot come
            raise CriterionError(SPENT_FORWARD)
        use.grad_output = _sample_first(grad, use.batch_dim)
        use.held += self._cache.hold((grad,))
        state.pending -= 1
        if state.pending == 0:
            self._finish_layer(state)

    def _finish_layer(self, state: _LayerState, allow_group: bool = True):
        """All output gradients of this layer are in: add its exact per-sample squared norm."""
        group = state.group
        if allow_group and group is not None and len(group.members) > 1:
            if any(len(m.uses) != 1 for m in group.members):
                state.group = None  # a reused member: its rows are not the group's rows
            else:
                group.ready.append(state)
                if len(group.ready) == len(group.members):
                    self._finish_group(group)
                return
        if allow_group and self.keep_for_bookkeeping and self._stackable(state):
            self._deferred.append(state)  # book-keeping holds (A, G) anyway: norm it with its same-shape peers
            return
        uses = [u for u in state.uses if u.grad_output is not None]  # a use whose output fed no loss adds 0
        if uses:
            sq, path = state.rule.sq_norm(state.module, uses, self._n, self.norm_backend)
            self._add_norm(state, sq, path)
        self._done(state)

    def _finish_deferred(self):
        """Norms of the deferred single-use Linears: one backend call per run of same-shape layers."""
        for run in self._stack_runs(self._deferred):
            if len(run) == 1:
                self._finish_layer(run[0], allow_group=False)
                continue
            sq, path = run[0].rule.stacked_sq_norms(
                [s.module for s in run], [s.uses[0] for s in run], self._n, self.norm_backend
            )
            self._sq_norm.add_(sq)
            for state in run:
                self.norm_paths[state.name] = path
                self._done(state)
        self._deferred = []

    def _finish_group(self, group):
        """Layers sharing one input: the backend may compute the input's Gram once for all of them."""
        members = group.members
        results = members[0].rule.group_sq_norms(
            [m.module for m in members], [m.uses[0] for m in members], self._n, self.norm_backend
        )
        for state, (sq, path) in zip(members, results):
            self._add_norm(state, sq, path)
            self._done(state)

    def _add_norm(self, state, sq, path):
        self._sq_norm.add_(sq)  # in place, no attribute write: nn.Module.__setattr__ is slow; add_ upcasts sq
        self.norm_paths[state.name] = path

    def _done(self, state):
        state.done = True
        if not self.keep_for_bookkeeping:
            self._release(state)

    def _release(self, state: _LayerState):
        for use in state.uses:
            self._cache.drop(use.held)
            use.release()  # the tap nodes of a retained graph still reference the Use: drop its tensors now
        state.uses = []
        state.pending = 0
        state.group = None

    def record_norms(self, loss_per_sample: torch.Tensor, *, retain_graph: bool) -> torch.Tensor:
        """Backward of sum_i loss_i that only records per-sample norms; returns clipping coefficients (n,)."""
        self._n = n = loss_per_sample.shape[0]
        self._check_coverage(loss_per_sample)
        acc = torch.float64 if loss_per_sample.dtype == torch.float64 else torch.float32
        self._sq_norm = torch.zeros(n, dtype=acc, device=loss_per_sample.device)
        self._deferred = []
        self.norm_backend.begin_step()  # its margin ledger: what this step's norms applied and saw
        if n > 0:
            self._record_backward(loss_per_sample, retain_graph)
        self._finish_deferred()
        for state in self._states:
            if not state.done:  # some uses (or group members) never reached the loss
                self._finish_layer(state, allow_group=False)
        norms = self._sq_norm.sqrt()
        self._per_sample_gradient_norms = norms
        # Rounding in the norms and after them (TF32, tensor cores, bf16 coefficients, a recomputing second
        # backward): the backend's factor makes f * norm an upper bound of what each sample adds (1.0 if exact).
        factor = self.norm_backend.clip_factor(two_pass=not self.keep_for_bookkeeping, loss_dtype=loss_per_sample.dtype)
        if factor != 1.0:
            norms = norms * factor
        self.step_health.note_norms(norms)
        return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)

    @property
    def norm_error_margin(self) -> dict:
        """The error margins of the last step's clipping (rule, factor, budgets per norm path): for records."""
        return self.norm_backend.margin_report()

    def _check_coverage(self, loss_per_sample: torch.Tensor) -> None:
        """Refuse before any gradient exists if a trainable parameter reaches the loss unseen by the rules."""
        if self._trainable_flags() != self._trainable:
            changed = [n for (n, p), was in zip(self._params.items(), self._trainable) if p.requires_grad != was]
            raise CoverageError(
                f"requires_grad changed after make_private for {', '.join(changed[:5])}: the engine chose its "
                "per-layer rules for the parameters trainable then. Set requires_grad before make_private."
            )
        structure = tuple(len(s.uses) for s in self._states)
        if structure == self._covered_structure or loss_per_sample.grad_fn is None or loss_per_sample.numel() == 0:
            return
        taps = {id(u.refs[0]): (s, u) for s in self._states for u in s.uses if u.refs}
        if not taps:  # a compiled forward: its eager first pass (same input signature) was walked instead
            return
        problems = uncovered_parameters(loss_per_sample.grad_fn, taps, self._owner, self._param_names)
        if problems:
            raise CoverageError(
                "trainable parameters reach the loss outside the forward of the module that owns them, where no "
                "per-sample rule sees them: "
                + "; ".join(problems)
                + ". Use the parameter only through its module (reuse the module object instead of reading its "
                "weight), or freeze it (requires_grad_(False))."
            )
        self._covered_structure = structure

    def abandon_step(self, error: BaseException) -> None:
        """A backward raised: drop every cache and make the optimizer refuse the step."""
        self._recording_backward = self._in_backward = False
        self._deferred = []
        self.step_health.note_failure(error)
        for state in self._states:
            self._release(state)
            state.done = False
        self._cache.reset()
        self._sq_norm = None

    def _record_backward(self, loss_per_sample: torch.Tensor, retain_graph: bool) -> None:
        """The backward that hands every use's output gradient to ``_on_grad_output`` (here: the taps do it)."""
        self._recording_backward = self._in_backward = True
        try:
            torch.autograd.grad(loss_per_sample.sum(), self._anchor, retain_graph=retain_graph, allow_unused=True)
        finally:
            self._recording_backward = self._in_backward = False

    def write_clipped_grads(self, coef: torch.Tensor):
        """Book-keeping: p.grad += sum_i c_i g_i from the cached (A, G) of every layer, freeing caches as it goes.

        Same-shape Linears (the q/k/v/out/MLP layers of all blocks) are clipped together, one batched GEMM per
        run of at most STACK_BYTES of stacked operands: at small batches the per-layer GEMMs are launch-bound.
        """
        clip = ClipCoefficients(coef)
        stackable = [s for s in self._states if self._stackable(s)]
        for batch in (run for run in self._stack_runs(stackable) if len(run) > 1):
            grads = batch[0].rule.stacked_clipped_grads(
                [s.module for s in batch], [s.uses[0] for s in batch], self._n, clip
            )
            self._write_grads(grads)
            for state in batch:
                self._release(state)
        for state in self._states:
            if state.uses:
                grads = state.rule.clipped_grads(
                    state.module, [u for u in state.uses if u.grad_output is not None], self._n, clip
                )
                self._write_grads(grads)
            self._release(state)

    @staticmethod
    def _write_grads(grads: dict) -> None:
        for p, g in grads.items():
            p.grad = g if p.grad is None else p.grad + g

    @staticmethod
    def _stackable(state: _LayerState) -> bool:
        return state.rule is LINEAR_RULE and len(state.uses) == 1 and state.uses[0].grad_output is not None

    def _stack_runs(self, states: list[_LayerState]) -> list[list[_LayerState]]:
        """``states`` (single-use Linears) split into runs of one stack key, each run's stacked A and G (and
        ghost's two Gram matrices) within STACK_BYTES; a layer with no partner is a run of one."""
        by_key: dict = {}
        for state in states:
            key = state.rule.stack_key(state.module, state.uses[0])
            by_key.setdefault(key if key is not None else id(state), []).append(state)
        runs = []
        for group in by_key.values():
            A, G = group[0].uses[0].inputs[0], group[0].uses[0].grad_output
            rows = A.numel() // max(1, self._n * A.shape[-1])
            per_layer = A.numel() * A.element_size() + G.numel() * G.element_size() + 8 * self._n * rows * rows
            size = max(1, STACK_BYTES // max(1, per_layer))
            runs += [group[i : i + size] for i in range(0, len(group), size)]
        return runs

    def end_step(self):
        """Forget this forward's caches; give never-used trainable parameters a zero gradient (they still get noise)."""
        for state in self._states:
            self._release(state)
            state.done = False
            for p in state.params():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self._cache.reset()
        self._sq_norm = None

    @property
    def per_sample_gradient_norms(self) -> torch.Tensor:
        """Norms of the last step: for debugging only, never to be logged or released (they are not private)."""
        if self._per_sample_gradient_norms is None:
            raise AttributeError("per_sample_gradient_norms is set by a backward pass")
        return self._per_sample_gradient_norms

    def kernel_backend(self) -> str:
        """'triton' or 'torch': what computes the Linear norms for this model's device and parameter dtype."""
        p = next(self._module.parameters())
        return self.norm_backend.kernel_backend(p.device, p.dtype)

    def stats(self) -> EngineStats:
        """The engine's cache peak since ``reset_peaks()``, each layer's norm path and the kernel backend."""
        backend = self.kernel_backend()
        rounding = None
        if backend == "triton":  # fp32 TF32 dots: operands rounded to nearest TF32, or truncated by the tensor cores
            from memory_test.kernels.flash_norms import tf32_rounding

            rounding = tf32_rounding()
        return EngineStats(
            cache_peak_bytes=self._cache.peak_bytes,
            kernel_backend=backend,
            norm_paths=dict(self.norm_paths),
            flash_tf32_rounding=rounding,
            # Slot for issue 15's public DPGradSampleModule.norm_error_margin: read when present, None before it.
            norm_error_margin=getattr(self, "norm_error_margin", None),
            post_programs=getattr(self, "post_programs_status", None),  # the compiled subclass has it
        )

    def reset_peaks(self) -> None:
        """Restart every peak ``stats()`` reports from what is held now (call it after warm-up steps)."""
        self.reset_dp_cache_peak()


def _detach(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def keyword_only_call(name: str) -> str:
    return (
        f"{name} was called with keyword arguments only: the DP engine reads a layer's input from its positional "
        f"arguments. Call it as layer(x) instead of layer(input=x)"
    )


def _sample_first(x, bd: int):
    """The layer's tensor with its batch dimension moved first (a view; rules then see (N, ..., f))."""
    return x.movedim(bd, 0) if bd and isinstance(x, torch.Tensor) else x


def _mark_boundary(use: Use, inputs: tuple, tap_node) -> None:
    """What the coverage walk needs: the tap node and the nodes (or leaf tensors) the layer's inputs come from."""
    refs = [tap_node]
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            refs.append(x.grad_fn if x.grad_fn is not None else x)
    use.refs = tuple(refs)
    use.boundary = frozenset(id(r) for r in refs[1:])
