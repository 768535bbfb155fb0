"""Which exact norm path each trainable layer takes under a mode (for inspect_dit_model.py and records)."""

from __future__ import annotations

import torch
from torch import nn

from .layer_rules import LinearLikeRule
from .modes import resolve_mode
from .norm_backends import NORM_BACKENDS
from .rules import rule_for


def describe_layers(module: nn.Module, mode_name: str, example_inputs: tuple | None = None) -> list[dict]:
    """One dict per trainable layer: name, type, trainable params, rule, forward uses and rows per sample, norm path.

    With ``example_inputs`` (a batch the module accepts positionally) one no-grad forward counts each layer's uses
    and its rows per sample T, from which the norm path is predicted the way the engine picks it.
    """
    backend = NORM_BACKENDS[resolve_mode(mode_name).norm]()
    layers = {}
    for name, sub in module.named_modules():
        params = [p for p in sub.parameters(recurse=False) if p.requires_grad]
        if params:
            rule = rule_for(sub)
            layers[sub] = {
                "name": name or "<root>",
                "type": type(sub).__name__,
                "trainable_params": sum(p.numel() for p in params),
                "rule": rule.name if rule is not None else "unsupported",
                "uses": None,
                "rows_per_sample": None,
                "norm_path": None,
            }
    if example_inputs is not None:
        _trace_uses(module, layers, example_inputs)
        for sub, info in layers.items():
            info["norm_path"] = _predict_path(sub, info, backend)
    return list(layers.values())


def _trace_uses(module: nn.Module, layers: dict, example_inputs: tuple) -> None:
    n = example_inputs[0].shape[0]

    def hook(sub, inputs, _output):
        info = layers[sub]
        info["uses"] = (info["uses"] or 0) + 1
        x = inputs[0]
        rows = x.numel() // (n * x.shape[-1]) if isinstance(sub, nn.Linear) else None
        info["rows_per_sample"] = (info["rows_per_sample"] or 0) + rows if rows is not None else None

    handles = [sub.register_forward_hook(hook) for sub in layers]
    try:
        with torch.no_grad():
            module(*example_inputs)
    finally:
        for h in handles:
            h.remove()


def _predict_path(sub: nn.Module, info: dict, backend) -> str | None:
    if not info["uses"]:
        return "unused"
    rule = rule_for(sub)
    if isinstance(sub, nn.Linear) and isinstance(rule, LinearLikeRule):
        return backend.predict_path(info["rows_per_sample"], sub.in_features, sub.out_features)
    return rule.name if rule is not None else "unsupported"
