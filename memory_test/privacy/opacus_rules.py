"""Upstream Opacus grad samplers the engine trusts, each for the configurations where it is exact.

Per-sample gradients are materialised (B x params) with Opacus' own functions, read from its registry without
modifying it. Only layer types listed in ``OPACUS_SAMPLED`` are used, each with the conditions under which the
sampler computes the true per-sample gradient of the layer's forward; anything else is refused, never guessed.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import GradSampleModule
from opacus.layers.dp_multihead_attention import SequenceBias
from torch import nn

from .layer_rules import as_coefficients, check_rows


class MaterializedRule:
    """Any layer Opacus has an exact per-sample grad sampler for: small layers only."""

    name = "materialized"
    summary = "Opacus' own per-sample grad sampler, materialised"

    def __init__(self, layer_type: type, supports, refuses: str = "", batch_dims=(0,)):
        self.grad_sampler = GradSampleModule.GRAD_SAMPLERS[layer_type]
        self._supports = supports
        self.refuses = refuses
        self.batch_dims = batch_dims

    def supports(self, module) -> str | None:
        return self._supports(module)

    def _per_sample(self, module, uses, n) -> dict:
        summed = {}
        for use in uses:
            check_rows(use.grad_output.shape[0], n)
            for p, gs in self.grad_sampler(module, list(use.inputs), use.grad_output).items():
                if p.requires_grad:
                    gs = gs.reshape(n, -1, *p.shape).sum(dim=1)  # K rows of a sample are one unit
                    summed[p] = summed[p] + gs if p in summed else gs
        return summed

    def sq_norm(self, module, uses, n, backend) -> tuple[torch.Tensor, str]:
        acc = backend.accumulate_dtype(uses[0].grad_output)
        total = torch.zeros(n, dtype=acc, device=uses[0].grad_output.device)
        for gs in self._per_sample(module, uses, n).values():
            total += gs.reshape(n, -1).to(acc).pow(2).sum(dim=1)
        return total, "materialized"

    def clipped_grads(self, module, uses, n, coef) -> dict:
        return {
            p: torch.einsum("n,n...->...", as_coefficients(coef).values.to(gs.dtype), gs).to(p.dtype)
            for p, gs in self._per_sample(module, uses, n).items()
        }


def _conv3d(module) -> str | None:
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (Opacus' Conv3d sampler pads with zeros)"
    if isinstance(module.padding, str):
        return f"padding={module.padding!r} (use integer padding)"
    return None


def _instance_norm(module) -> str | None:
    if module.track_running_stats:
        return "track_running_stats=True normalises with running statistics in eval mode (the sampler uses batch ones)"
    return None


def _always(module) -> str | None:
    return None


# Layer type -> rule, for types with no rule of this package's own.
_NO_RUNNING_STATS = "track_running_stats=True"
OPACUS_SAMPLED = {
    nn.Conv3d: MaterializedRule(nn.Conv3d, _conv3d, "padding_mode other than zeros, string padding"),
    nn.InstanceNorm1d: MaterializedRule(nn.InstanceNorm1d, _instance_norm, _NO_RUNNING_STATS),
    nn.InstanceNorm2d: MaterializedRule(nn.InstanceNorm2d, _instance_norm, _NO_RUNNING_STATS),
    nn.InstanceNorm3d: MaterializedRule(nn.InstanceNorm3d, _instance_norm, _NO_RUNNING_STATS),
    SequenceBias: MaterializedRule(SequenceBias, _always, batch_dims=(0, 1)),
}
