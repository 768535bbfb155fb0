"""Every trainable parameter that reaches the loss must do so inside a forward call of the module that owns it.

The recording backward never reaches a parameter (see grad_sample_module), so a parameter used *outside* its
module's forward — a GPT head tied functionally (``h @ wte.weight.t()``), a parameter read by another module's
forward — would be missing from the per-sample norms: the norms would be too small and clipping too weak, in every
mode, without any error. This module walks the autograd graph of the per-sample losses once per new forward
structure, before the backward, and names every such parameter.

The walk: from the loss, nodes are "outside" every layer until a layer use's tap node is met; from there on they
are "inside" that use until one of the use's input nodes is reached (the use's boundary), where the walk is outside
again (or inside the enclosing use). An AccumulateGrad node of a trainable parameter must be met inside a use of
the module that owns the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

# Autograd nodes that run a hidden backward of their own, reaching parameters the walk (and the engine) cannot see.
OPAQUE_NODES = {
    "CheckpointFunctionBackward": "reentrant activation checkpointing (torch.utils.checkpoint with "
    "use_reentrant=True) recomputes layers inside its own backward, out of the engine's sight: use use_reentrant=False",
}


@dataclass(frozen=True, eq=False)
class _Frame:
    state: object
    boundary: frozenset  # ids of the use's input nodes and leaf input tensors
    parent: _Frame | None


def uncovered_parameters(root, taps: dict, owner: dict, names: dict) -> list[str]:
    """Descriptions of trainable parameters that reach ``root`` outside their owner's forward (or opaque nodes).

    ``taps``: id(tap node) -> (state, use) for every recorded use; ``owner``: id(param) -> state; ``names``:
    id(param) -> qualified name. The caller keeps every node and tensor referenced by these ids alive.
    """
    problems: dict[int, str] = {}
    stack = [(root, None, "the loss")]
    seen: set = set()
    while stack:
        node, frame, via = stack.pop()
        if node is None or (id(node), id(frame)) in seen:
            continue
        seen.add((id(node), id(frame)))
        frame = _leave(frame, id(node))
        tap = taps.get(id(node))
        if tap is not None:
            state, use = tap
            inner = _Frame(state, use.boundary, frame)
            stack.append((node.next_functions[0][0], inner, state.name))  # [1] is the engine's anchor
            continue
        var = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor
        if var is not None:
            _check_leaf(var, _leave(frame, id(var)), owner, names, via, problems)
            continue
        label = type(node).__name__
        if label in OPAQUE_NODES:
            problems.setdefault(id(node), OPAQUE_NODES[label])
            continue
        stack.extend((nxt, frame, label) for nxt, _ in node.next_functions)
    return list(problems.values())


def _leave(frame, key):
    while frame is not None and key in frame.boundary:
        frame = frame.parent
    return frame


def _check_leaf(var, frame, owner, names, via, problems) -> None:
    state = owner.get(id(var))
    if state is None or not var.requires_grad or id(var) in problems:
        return
    if frame is not None and frame.state is state:
        return
    where = f"inside {frame.state.name}'s forward" if frame is not None else "outside any layer's forward"
    problems[id(var)] = f"{names[id(var)]} (used by {via}, {where})"
