"""Affine normalisation layers (LayerNorm, RMSNorm, GroupNorm): exact per-sample gradients, materialised.

Their parameters are small (one value per channel), so per-sample gradients are formed outright: the weight's is
Σ_rows G ⊙ x̂ and the bias's Σ_rows G, with x̂ the layer's normalised input recomputed from the cached input by the
same functional op the layer runs. Weight and bias are each optional (``bias=False`` layers have no bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer_rules import _trainable, as_coefficients, check_rows
from .norm_backends import accumulate_dtype


class AffineNormRule:
    """Shared by the three norms; subclasses say how to normalise and which axes hold the parameters."""

    name = "affine_norm"
    summary = "per-sample gradients materialised from the recomputed normalised input (weight, bias optional)"
    refuses = ""
    batch_dims = (0, 1)

    @staticmethod
    def supports(module) -> str | None:
        return None

    def normalized(self, module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_row(self, module, t: torch.Tensor) -> torch.Tensor:
        """Reduce a (rows, ...) tensor to (rows, *param.shape) by summing the axes the parameter is broadcast over."""
        raise NotImplementedError

    def per_sample(self, module, uses, n, dtype_of=accumulate_dtype) -> dict:
        """{parameter: (n, *parameter.shape)} summed over every use (a reused layer's uses add up), computed in
        ``dtype_of(G)`` (the norm backend asks for float64 where its margins need the small layers exact)."""
        out: dict = {}
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        for use in uses:
            x, G = use.inputs[0], use.grad_output
            dtype = dtype_of(G)
            G = G.to(dtype)
            check_rows(G.shape[0], n)
            if _trainable(weight):
                g = self.per_row(module, G * self.normalized(module, x.to(dtype)))
                _add(out, weight, g.reshape(n, -1, *weight.shape).sum(dim=1))
            if _trainable(bias):
                _add(out, bias, self.per_row(module, G).reshape(n, -1, *bias.shape).sum(dim=1))
        return out

    def sq_norm(self, module, uses, n, backend) -> tuple[torch.Tensor, str]:
        grads = self.per_sample(module, uses, n, backend.accumulate_dtype)
        total = sum(g.reshape(n, -1).pow(2).sum(dim=1) for g in grads.values())
        return total, "materialized"

    def clipped_grads(self, module, uses, n, coef) -> dict:
        c = as_coefficients(coef).values
        grads = self.per_sample(module, uses, n)
        return {p: torch.einsum("n,n...->...", c.to(g.dtype), g).to(p.dtype) for p, g in grads.items()}


def _add(out: dict, p, g) -> None:
    out[p] = out[p] + g if p in out else g


class TrailingAffineRule(AffineNormRule):
    """LayerNorm / RMSNorm: normalised over (and parameterised along) the trailing ``normalized_shape`` axes."""

    def per_row(self, module, t):
        lead = t.dim() - len(module.normalized_shape)
        return t.reshape(t.shape[0], -1, *module.normalized_shape).sum(dim=1) if lead > 1 else t


class LayerNormRule(TrailingAffineRule):
    name = "layer_norm"

    def normalized(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


class RMSNormRule(TrailingAffineRule):
    name = "rms_norm"

    def normalized(self, module, x):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)


class GroupNormRule(AffineNormRule):
    """GroupNorm over (N, C, *spatial): parameters are per channel (axis 1)."""

    name = "group_norm"
    batch_dims = (0,)

    def normalized(self, module, x):
        return F.group_norm(x, module.num_groups, None, None, module.eps)

    def per_row(self, module, t):
        return t.flatten(2).sum(dim=2) if t.dim() > 2 else t


NORM_RULES = {nn.LayerNorm: LayerNormRule(), nn.GroupNorm: GroupNormRule()}
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    NORM_RULES[nn.RMSNorm] = RMSNormRule()
