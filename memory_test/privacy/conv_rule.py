"""Conv1d / Conv2d as a Linear over the patches the convolution reads: every padding mode, stride, dilation, groups.

The patches are taken exactly as ``nn.Conv*d._conv_forward`` reads its input: the module's own padding
(``_reversed_padding_repeated_twice``, which also holds the asymmetric split of ``padding="same"``) is applied
first with the module's ``padding_mode`` (zeros, reflect, replicate, circular), then the padded input is unfolded
with no further padding. Groups are independent Linears (group ``g`` maps input channels of group ``g`` to output
channels of group ``g``), so each sample's groups are handled as extra samples and summed back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layer_rules import (
    LinearLikeRule,
    _per_sample_rows,
    _trainable,
    as_coefficients,
    check_rows,
    matmul_dtype,
    weight_and_bias_grads,
)


def conv_patches(module, x: torch.Tensor) -> torch.Tensor:
    """(N, Cin, *spatial) -> (N, Cin * prod(kernel), L): what each output position of ``module`` reads."""
    pad = tuple(module._reversed_padding_repeated_twice)
    if any(pad):
        x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if x.dim() == 3:  # Conv1d: a Conv2d of height 1
        x, kernel, dilation, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    return F.unfold(x, kernel, dilation, 0, stride)


class ConvRule(LinearLikeRule):
    """nn.Conv1d / nn.Conv2d: rows are output positions, features are the patches they read."""

    name = "conv"
    summary = "a Linear over the patches read (padding applied first: zeros, reflect, replicate, circular, 'same')"
    refuses = ""
    batch_dims = (0,)  # unfold needs (N, C, *spatial)

    @staticmethod
    def supports(module) -> str | None:
        return None  # every padding mode, string padding, stride, dilation and groups

    def rows(self, module, use, n):
        """(n * groups, K * L, Cin/groups * k) patches and (n * groups, K * L, Cout/groups) output gradients."""
        g = module.groups
        patches = conv_patches(module, use.inputs[0])  # (N, Cin*k, L)
        G = use.grad_output.flatten(2)  # (N, Cout, L)
        if g == 1:
            return _per_sample_rows(patches.transpose(1, 2), n), _per_sample_rows(G.transpose(1, 2), n)
        N, L = patches.shape[0], patches.shape[-1]
        A = patches.view(N, g, -1, L).transpose(2, 3)  # (N, g, L, d/g)
        G = G.view(N, g, -1, L).transpose(2, 3)  # (N, g, L, p/g)
        return _groups_as_samples(A, n), _groups_as_samples(G, n)

    def fold(self, per_row_sample: torch.Tensor, module, n: int) -> torch.Tensor:
        return per_row_sample.view(n, module.groups).sum(dim=1)

    def clipped_grads(self, module, uses, n, coef) -> dict:
        if module.groups == 1:
            return super().clipped_grads(module, uses, n, coef)
        return self._grouped_clipped_grads(module, uses, n, as_coefficients(coef))

    def _grouped_clipped_grads(self, module, uses, n, clip) -> dict:
        g, weight, bias = module.groups, module.weight, module.bias
        gw = gb = None
        for use in uses:
            A, G = self.rows(module, use, n)  # (n*g, R, d), (n*g, R, p)
            R, d, p = A.shape[1], A.shape[-1], G.shape[-1]
            c = clip.values.to(G.dtype).repeat_interleave(g).view(-1, 1, 1)
            Gc = (G * c).view(n, g, R, p)
            if _trainable(weight):
                dtype = matmul_dtype(A, G)
                lhs = Gc.transpose(0, 1).reshape(g, n * R, p).to(dtype)
                rhs = A.view(n, g, R, d).transpose(0, 1).reshape(g, n * R, d).to(dtype)
                w = torch.bmm(lhs.transpose(1, 2), rhs)  # (g, p, d)
                gw = w if gw is None else gw + w
            if _trainable(bias):
                b = Gc.sum(dim=(0, 2)).reshape(-1)  # (g * p,) in output-channel order
                gb = b if gb is None else gb + b
        return weight_and_bias_grads(weight, gw, bias, gb)


def _groups_as_samples(x: torch.Tensor, n: int) -> torch.Tensor:
    """(n*K, g, L, f) -> (n * g, K * L, f): each (sample, group) pair becomes one row block."""
    N, g, L, f = x.shape
    check_rows(N, n)
    return x.reshape(n, N // n, g, L, f).transpose(1, 2).reshape(n * g, -1, f)
