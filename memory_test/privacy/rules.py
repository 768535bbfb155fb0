"""The rules registry: which exact per-sample rule handles each trainable layer type, and what is refused.

Lookup is by exact type (FSDP2's wrapper class unwrapped): a subclass may override ``forward``, so it is not assumed
to share its parent's math. A type not listed here, or a listed type in a configuration its rule does not support,
is refused with the reason and what to do; nothing falls back to an approximate rule.
"""

from __future__ import annotations

from opacus.layers.dp_rnn import RNNLinear
from torch import nn
from torch.distributed.fsdp import FSDPModule

from .conv_rule import ConvRule
from .layer_rules import LINEAR_RULE, EmbeddingRule
from .norm_rules import NORM_RULES
from .opacus_rules import OPACUS_SAMPLED

_CONV = ConvRule()

RULES: dict[type, object] = {
    nn.Linear: LINEAR_RULE,
    RNNLinear: LINEAR_RULE,  # Opacus' DPLSTM cell layer: a plain Linear applied once per time step
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Embedding: EmbeddingRule(),
    **NORM_RULES,
    **OPACUS_SAMPLED,
}


def layer_type(module: nn.Module) -> type:
    """The layer's own class: FSDP2's ``fully_shard`` swaps it for a subclass ``FSDP<cls>(FSDPModule, cls)``."""
    cls = type(module)
    if isinstance(module, FSDPModule) and cls.__bases__[0] is FSDPModule:
        return cls.__bases__[1]
    return cls


# Every rule differentiates its layer's forward with respect to the layer's own ``weight`` and ``bias``.
RULE_PARAMETERS = ("weight", "bias")


def _other_parameters(module: nn.Module) -> str | None:
    """Trainable parameters a rule would not see: a reparametrised weight (torch.nn.utils.weight_norm keeps
    ``weight_g`` and ``weight_v``, spectral_norm ``weight_orig``, and computes ``weight`` from them in a pre-hook)."""
    other = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad and n not in RULE_PARAMETERS]
    if not other:
        return None
    return (
        f"trainable parameters {', '.join(other)} besides weight and bias (a reparametrised weight, e.g. "
        "torch.nn.utils.weight_norm or spectral_norm: per-sample gradients of the computed weight are not those of "
        "its parameters; remove the reparametrisation or freeze them)"
    )


def lookup(module: nn.Module) -> tuple[object | None, str]:
    """(rule, "") for a supported layer, (None, why not) otherwise."""
    cls = layer_type(module)
    rule = RULES.get(cls)
    if rule is None:
        return None, cls.__name__  # no rule for this type at all
    reason = rule.supports(module) or _other_parameters(module)
    return (None, f"{cls.__name__} with {reason}") if reason else (rule, "")


def rule_for(module: nn.Module):
    """The rule that handles ``module``, or None if this engine cannot clip its parameters exactly."""
    return lookup(module)[0]


def supported_layer_names() -> list[str]:
    return sorted(cls.__name__ for cls in RULES)
