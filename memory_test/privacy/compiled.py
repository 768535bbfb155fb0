"""DP-SGD under torch.compile, exactly: ``dp_model.compile(...)`` after ``make_private`` (in place, like nn.Module).

Why the eager engine cannot simply be traced: its taps call back into Python from the backward, its caches are keyed
by ``id()`` and storage pointers (graph breaks, recompiles), and it skips the weight-gradient GEMMs by differentiating
w.r.t. a scalar anchor, which a compiled backward (one graph for every input that requires grad) cannot skip.

The compiled path records with nothing Dynamo cannot trace or replay:

- Sinks. Each use of a trainable layer passes its output through ``_SinkTap(output, sink)``: identity forward, and a
  backward that returns the output gradient G for both inputs. ``sink`` is a leaf made outside the graph before the
  forward: one zero expanded to the output's shape (one element of memory). ``torch.autograd.grad(Σ loss_i, sinks)``
  then returns every use's G exactly, without a copy (an output of the compiled backward).
- Inputs. The forward hook appends ``(inputs, sink)`` to a list on the module; Dynamo replays the append after the
  graph, the inputs being extra graph outputs (the tensors autograd would save for the weight gradient anyway).
- Rules. After the backward each use is the same ``Use(inputs, grad_output)`` the eager taps build, and the eager
  engine's per-layer rules, input groups, stacking and clipping run on them unchanged (eagerly; Triton kernels too).
- Book-keeping modes run the forward with the trainable parameters' requires_grad off, so the compiled backward
  computes activation gradients only and the rules write Σ c_i G_iᵀA_i. Two-pass modes keep them on, retain the graph
  (their compiles run with AOTAutograd's donated buffers off, which a retained graph needs) and run the second backward
  of Σ c_i loss_i; the sinks stop requiring grad in between so that it accumulates nothing into them.
- Shapes. Sinks need each use's output shape before the forward. The first forward of an input signature (non-batch
  shapes, dtypes, devices, autocast) runs eagerly (``set_stance("force_eager")``) and makes them as it goes; later
  forwards of that signature get sinks scaled to their batch (a use's rows are a fixed multiple of the input's rows).
  A new batch size changes the sinks' and inputs' shapes alike: Dynamo recompiles once, marks the batch dimension
  dynamic (automatic dynamic shapes; the DP forward lets sinks, attributes of built-in layers, be dynamic too), and
  serves every later size from that graph (``compile_stats`` counts it).

A use whose sink is missing or of the wrong shape gets one made at a graph break (exact, and counted; an error under
``fullgraph=True``); a layer used more than ``MAX_USES`` times per forward, or whose rows are not a multiple of the
input's, raises. ``torch.compile(dp_model)`` around the eager engine stays exact through a graph break at every tap
(see ``grad_sample_module._untraced``): ``dp_model.compile()`` is the fast path.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch import nn

from .compile_options import uses_cuda_graphs
from .errors import SPENT_FORWARD, CriterionError, PrivacyConfigError
from .grad_sample_module import (
    _AUTOCAST_LOWERED,
    DPGradSampleModule,
    _mark_boundary,
    autocast_target,
    keyword_only_call,
)
from .layer_rules import Use
from .modes import MODES
from .post_programs import PostPrograms

MAX_USES = 64  # uses of one layer per forward (DiT: 2, block 0's embedder)
# One attribute per use, not a list: Dynamo would guard the list's length, which differs between layers.
_SINK_ATTRS = tuple(f"_dp_sink{i}" for i in range(MAX_USES))
_NAME_ATTR = "_dp_name"  # the layer's name in the model, for errors
_USES_ATTR = "_dp_uses"  # a list while a recording forward runs, None otherwise
SINK_SETS_KEPT = 16  # batch sizes whose sinks are kept (Poisson batches vary; each set is ~one tensor header per use)
_sinks_made = [0]  # sinks made during a forward (eager pass, or a graph break): the plan is then relearned


class _SinkTap(torch.autograd.Function):
    """Identity on a layer's output whose backward also hands the output gradient to the sink."""

    @staticmethod
    def forward(ctx, output, sink):
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


def _sink(shape, dtype, device) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=device).expand(shape).detach().requires_grad_()


@torch.compiler.disable
def _sink_like(output: torch.Tensor) -> torch.Tensor:
    """A sink made during the forward: in the eager pass, or (in a graph) at a graph break."""
    _sinks_made[0] += 1
    return _sink(output.shape, output.dtype, output.device)


def _record_use(module: nn.Module, inputs: tuple, output):
    """Forward hook (one function for every layer, so that repeated blocks share one compiled graph)."""
    uses = getattr(module, _USES_ATTR, None)
    if uses is None or not torch.is_grad_enabled():  # recorded in eval mode too: eval changes statistics, not grads
        return None
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{type(module).__name__}: DP sinks need a tensor output, got {type(output).__name__}")
    if not inputs:  # read only here: a per-layer attribute on the traced path would be a guard per block
        raise PrivacyConfigError(keyword_only_call(module.__dict__.get(_NAME_ATTR, type(module).__name__)))
    if len(uses) >= MAX_USES:
        raise PrivacyConfigError(f"a {type(module).__name__} ran more than {MAX_USES} times in one forward")
    sink = getattr(module, _SINK_ATTRS[len(uses)], None)
    if sink is None or sink.shape != output.shape or sink.dtype != output.dtype:
        sink = _sink_like(output)
    tapped = _SinkTap.apply(output, sink)
    # Eager passes also keep the autograd nodes the coverage walk needs (a traced forward has none to give).
    uses.append((inputs, sink, None if torch.compiler.is_compiling() else tapped.grad_fn))
    return tapped


def _cast_for_autocast(module: nn.Module, inputs: tuple):
    """The eager engine's ``_cast_input`` (see there) without its per-step cache: in a graph, CSE shares the cast."""
    x = inputs[0] if inputs else None
    dtype = autocast_target(x) if getattr(module, _USES_ATTR, None) is not None else None
    return None if dtype is None else (x.to(dtype), *inputs[1:])


def _signature(args: tuple, kwargs: dict) -> tuple[tuple, int]:
    """(what fixes every use's output shape but the batch, the batch rows) of one forward's arguments."""
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    if not tensors or tensors[0].dim() == 0:
        raise PrivacyConfigError("a compiled DP model needs the batch as its first tensor argument (rows in dim 0)")
    device_types = sorted({t.device.type for t in tensors})
    autocast = tuple((d, torch.get_autocast_dtype(d)) for d in device_types if torch.is_autocast_enabled(d))
    shapes = tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in tensors)
    return (shapes, tuple(kwargs), autocast), tensors[0].shape[0]


@contextlib.contextmanager
def _frozen(params: list[torch.Tensor]):
    """Parameters that do not require grad during the forward: the compiled backward then computes no weight grads."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class CompiledDPGradSampleModule(DPGradSampleModule):
    """A DPGradSampleModule after ``compile()``: sink recording (see the module docstring) instead of taps."""

    def _init_compiled(self) -> None:
        self.remove_hooks()  # the eager taps and casts
        for state in self._states:
            if type(state.module) in _AUTOCAST_LOWERED:
                self._handles.append(state.module.register_forward_pre_hook(_cast_for_autocast))
            self._handles.append(state.module.register_forward_hook(_record_use))
            state.module.__dict__[_NAME_ATTR] = state.name
        self._plans: dict[tuple, list] = {}  # signature -> per layer, per use: (row multiple, rest, dtype, device)
        self._sink_sets: OrderedDict = OrderedDict()  # (signature, rows) -> per layer, the sinks of its uses
        self._armed = None  # the (signature, rows) whose sinks the layers hold
        self._taps: list[tuple] | None = None  # (state, use, sink) of the last forward; None once a backward used it
        self._programs: PostPrograms | None = None  # set by compile_private
        self._cuda_graphs = False  # set by compile_private: the blocks replay as CUDA graphs (book-keeping only)

    # ----- forward -------------------------------------------------------------------------------------------
    @torch.compiler.disable  # torch.compile(dp_model) on top of dp_model.compile(): this part stays eager
    def forward(self, *args, **kwargs):
        if not (torch.is_grad_enabled() and self.hooks_enabled):
            return self._module(*args, **kwargs)
        self._before_recorded_forward(args, kwargs)  # batch statistics, rows, the layout check (eager probes)
        self._refuse_sequence_first()
        signature, rows = _signature(args, kwargs)
        plan = self._plans.get(signature)
        recording = rows > 0  # no sample, nothing to record (as with the eager taps, whose uses get no gradient)
        if recording:
            self._arm(signature, rows, plan)
        if recording and plan is not None and self._cuda_graphs:
            # A new step for CUDA graph trees: the last step's recorded tensors (its graphs' outputs, released at its
            # end) may be overwritten from here on, and reading one raises instead of returning stale data.
            torch.compiler.cudagraph_mark_step_begin()
        made = _sinks_made[0]
        # The first forward of a signature runs eagerly, parameters attached: the coverage walk sees every path.
        try:  # every compiled call from here runs under the same settings, recording or not
            with self._forward_context(eager=recording and plan is None):
                output = self._module(*args, **kwargs)
        finally:
            self._collect()
        if recording and _sinks_made[0] != made:  # eager pass or a graph break: these shapes are the plan
            self._learn(signature, rows)
        return output

    def _forward_context(self, *, eager: bool) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        # Sinks are tensor attributes of built-in layers, which Dynamo would otherwise keep static: every batch size
        # would compile anew instead of the batch dimension becoming dynamic like the inputs'.
        stack.enter_context(torch._dynamo.config.patch(force_nn_module_property_static_shapes=False))
        if eager:
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        if self.keep_for_bookkeeping and not eager:
            stack.enter_context(_frozen([p for state in self._states for p in state.params()]))
        else:  # the recording backward retains the graph for the second one
            stack.enter_context(torch._functorch.config.patch(donated_buffer=False))
        return stack

    def _refuse_sequence_first(self) -> None:
        seq_first = [s.name for s in self._states if s.batch_dim not in (None, 0)]
        if seq_first:
            raise PrivacyConfigError(
                f"{', '.join(seq_first)} hold the batch in dimension 1 (sequence first): compiled DP records "
                "batch-first layers only. Use the eager engine (do not call compile()), or a batch-first layout."
            )

    def _arm(self, signature, rows: int, plan) -> None:
        """Give every layer an empty use list and, when the shapes are known, the sinks of this batch size."""
        for state in self._states:
            state.module.__dict__[_USES_ATTR] = []
        if plan is None:  # the eager pass makes every sink
            self._clear_sinks()
            return
        key = (signature, rows)
        sinks = self._sink_sets.get(key)
        if sinks is None:
            sinks = self._sink_sets[key] = [[_sink((m * rows, *rest), dt, dev) for m, rest, dt, dev in p] for p in plan]
            while len(self._sink_sets) > SINK_SETS_KEPT:
                if self._sink_sets.popitem(last=False)[0] == self._armed:
                    self._armed = None
        if key != self._armed:
            for state, layer_sinks in zip(self._states, sinks):
                state.module.__dict__.update(zip(_SINK_ATTRS, layer_sinks))
            self._armed = key
        if not self.keep_for_bookkeeping:  # the last two-pass step switched them off
            for layer_sinks in sinks:
                for s in layer_sinks:
                    s.requires_grad_(True)

    def _clear_sinks(self) -> None:
        for state in self._states:
            for attr in [a for a in state.module.__dict__ if a.startswith("_dp_sink")]:
                del state.module.__dict__[attr]
        self._armed = None

    def _collect(self) -> None:
        """Each recorded use becomes the ``Use`` an eager tap would have made; the layers' lists are let go."""
        taps = []
        for state in self._states:
            recorded = state.module.__dict__.get(_USES_ATTR)
            state.module.__dict__[_USES_ATTR] = None
            for inputs, sink, node in recorded or ():
                use = Use(inputs)
                if node is not None:
                    _mark_boundary(use, inputs, node)
                use.held = self._cache.hold(use.tensors())
                state.uses.append(use)
                state.pending += 1
                if state.groupable and state.group is None:
                    state.group = self._cache.group_for(inputs[0], state)
                taps.append((state, use, sink))
        self._taps = taps

    def _learn(self, signature, rows: int) -> None:
        """The sinks of the forward that just ran are the plan for its signature (and the set for its batch)."""
        plan, sinks = [[] for _ in self._states], [[] for _ in self._states]
        index = {id(state): i for i, state in enumerate(self._states)}
        for state, _, sink in self._taps:
            if sink.dim() == 0 or sink.shape[0] % rows:
                raise PrivacyConfigError(
                    f"{state.name}: its output has {tuple(sink.shape)} rows-first, not a multiple of the input's "
                    f"{rows} rows; compiled DP needs every trainable layer's output batch-first"
                )
            plan[index[id(state)]].append((sink.shape[0] // rows, tuple(sink.shape[1:]), sink.dtype, sink.device))
            sinks[index[id(state)]].append(sink)
        self._plans[signature] = plan
        self._sink_sets[(signature, rows)] = sinks
        self._clear_sinks()  # the next forward arms this set afresh

    # ----- backward-time work --------------------------------------------------------------------------------
    def _record_backward(self, loss_per_sample: torch.Tensor, retain_graph: bool) -> None:
        """One backward w.r.t. every sink: each use's output gradient, then the eager engine's per-layer work."""
        taps = self._taps
        if taps is None:  # the uses of this forward were spent by an earlier DP backward (or never recorded)
            raise CriterionError(SPENT_FORWARD)
        sinks = [sink for _, _, sink in taps]
        with torch.enable_grad():  # record_norms runs under no_grad, and the sum must stay on the graph
            total = loss_per_sample.sum()
        # AOTAutograd checks donated buffers again when a retained backward first runs (with the setting of that moment)
        with torch._functorch.config.patch(donated_buffer=False):
            grads = torch.autograd.grad(total, sinks, retain_graph=retain_graph, allow_unused=True) if sinks else ()
        if retain_graph:  # the second backward (Σ c_i loss_i) must accumulate nothing into them
            for sink in sinks:
                sink.requires_grad_(False)
        # They arrive together (the eager taps hand them over one by one): count them all while the layers run.
        arrived = self._cache.hold([g for g in grads if g is not None])
        programs = self._programs
        in_program = programs.states if programs is not None else ()
        for (state, use, _), grad in zip(taps, grads):
            if grad is None:  # this use fed no loss (adds 0, as with the eager taps)
                continue
            if id(state) in in_program:  # normed below, with its block
                use.grad_output = grad
                use.held += self._cache.hold((grad,))
            else:
                self._on_grad_output(state, use, grad)
        if programs is not None:
            programs.add_sq_norms(self)
        self._cache.drop(arrived)

    def record_norms(self, loss_per_sample: torch.Tensor, *, retain_graph: bool) -> torch.Tensor:
        with torch.no_grad():  # the cached inputs are graph outputs that require grad: the rules must not record
            return super().record_norms(loss_per_sample, retain_graph=retain_graph)

    def write_clipped_grads(self, coef: torch.Tensor):
        with torch.no_grad():
            if self._programs is not None:
                self._programs.write_clipped_grads(self, coef)
            super().write_clipped_grads(coef)  # the layers outside the programs

    @property
    def post_programs_status(self) -> str:
        """How the per-layer work after the backward runs: 'compiled' (programs per repeated block, the rest eager),
        'eager: <why>' (programs fell back), or 'off' (no programs: compile(programs=False), or no repeated block)."""
        return "off" if self._programs is None else self._programs.status

    def end_step(self):
        super().end_step()
        self._taps = None
        if self._programs is not None:
            self._programs.forget_step()

    def abandon_step(self, error: BaseException) -> None:
        super().abandon_step(error)
        self._taps = None
        if self._programs is not None:
            self._programs.forget_step()


# Which compiled class serves which wrapped-model class; any other (the sharded modes) cannot be compiled yet.
COMPILED_CLASSES = {
    DPGradSampleModule: CompiledDPGradSampleModule,
    CompiledDPGradSampleModule: CompiledDPGradSampleModule,
}


def compile_private(gsm: DPGradSampleModule, *args, regional: bool = False, programs: bool = True, **kwargs) -> None:
    """Switch ``gsm`` to sink recording and torch.compile its model in place (arguments as for ``torch.compile``).

    ``regional=True`` compiles each repeated block instead of the whole model (see ``compile_regions``).
    ``programs=True`` also compiles the per-layer work after the backward, one program per repeated block
    (``memory_test.privacy.post_programs``; ``gsm.post_programs_status`` says how it runs).
    """
    cls = COMPILED_CLASSES.get(type(gsm))
    if cls is None:
        sharded = ", ".join(sorted(n for n, m in MODES.items() if m.distributed))
        single = ", ".join(sorted(n for n, m in MODES.items() if not m.distributed))
        raise PrivacyConfigError(
            f"{type(gsm).__name__} cannot be compiled yet: the sharded modes ({sharded}) run eagerly. Drop compile "
            f"for them, or compile a single-process mode ({single})"
        )
    if uses_cuda_graphs(kwargs) and not gsm.keep_for_bookkeeping:
        raise PrivacyConfigError(
            "CUDA graphs (mode='reduce-overhead' or triton.cudagraphs) with a two-pass mode: its second backward "
            "replays the recording graph, which CUDA graph trees do not support exactly. Use a book-keeping mode "
            "(flash_clip_bk, bookkeeping) for CUDA graphs, or compile this mode with mode='default'"
        )
    if type(gsm) is not cls:
        gsm.__class__ = cls  # as FSDP2's fully_shard does: same object, same state, the compiled subclass' methods
        gsm._init_compiled()
    gsm._cuda_graphs = uses_cuda_graphs(kwargs)
    compile_regions(gsm._module, *args, regional=regional, **kwargs)
    blocks = repeated_blocks(gsm._module)
    gsm._programs = PostPrograms.for_model(gsm._states, blocks, kwargs) if programs and not args else None


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: diffusers' ``_repeated_blocks`` class names where a submodule declares them,
    else the children of every ModuleList of two or more modules of one class (outermost only)."""
    declared = {name for m in module.modules() for name in (getattr(m, "_repeated_blocks", None) or ())}
    if declared:
        blocks = [m for m in module.modules() if type(m).__name__ in declared]
    else:
        blocks = [
            child
            for m in module.modules()
            if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1
            for child in m
        ]
    inner = {id(sub) for b in blocks for sub in b.modules() if sub is not b}
    return [b for b in blocks if id(b) not in inner]


def compile_regions(module: nn.Module, *args, regional: bool = False, **kwargs) -> int:
    """torch.compile ``module`` in place, whole or (``regional``) block by block; returns the regions compiled.

    Regional compilation traces one block: with ``inline_inbuilt_nn_modules`` (torch's default) every block of the
    same class and input layout reuses that graph, so compile time does not grow with depth. Use the same call for
    the non-private baseline, so that both are compiled alike.
    """
    if not regional:
        module.compile(*args, **kwargs)
        return 1
    blocks = repeated_blocks(module)
    if not blocks:
        raise ValueError(
            f"{type(module).__name__} has no repeated blocks (no `_repeated_blocks`, no ModuleList of one block "
            "class): compile it whole (regional=False)"
        )
    for block in blocks:
        block.compile(*args, **kwargs)
    return len(blocks)
