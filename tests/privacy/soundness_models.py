"""The soundness table's model families: each a float64 model, its per-row inputs and what the engine must do.

A case's ``expect`` is None ("exact": every mode equals the one-sample-at-a-time clipped reference) or the engine
error it must raise before any update. Inputs are batch-first; models that run sequence-first inside (DPMHA with
``batch_first=False``) transpose themselves, as a user's model would.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus.layers import DPGRU, DPLSTM, DPMultiheadAttention
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memory_test.privacy import (
    MODES,
    CoverageError,
    LayoutError,
    PrivacyEngine,
    SharedParameterError,
    UnsupportedLayerError,
)
from memory_test.privacy.reference import clipped_sum, per_sample_gradients, per_sample_norms

F64 = torch.float64


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]  # a float64 model, random non-zero weights
    inputs: Callable[[int, torch.Generator], tuple]  # R rows -> forward arguments (batch first)
    expect: type[Exception] | None = None  # None: exact in every mode
    k: int = 1  # noise multiplicity: rows per sample
    eval_before: bool = False  # model.eval() before make_private
    eval_after: bool = False  # model.eval() after make_private (a validation habit)


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Non-zero random weights everywhere (zero inits would hide whole paths), in float64."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * scale)
    return model


def _x(*shape):
    return lambda rows, gen: (torch.randn(rows, *shape, generator=gen, dtype=F64),)


def _tokens(vocab, length):
    return lambda rows, gen: (torch.randint(0, vocab, (rows, length), generator=gen),)


# ----- diffusers ------------------------------------------------------------------------------------------------
def _tiny_dit():
    from tests.conftest import TinyDiT

    return TinyDiT().double()


def _dit_inputs(rows, gen):
    x = torch.randn(rows, 4, 4, 4, generator=gen, dtype=F64)
    return x, torch.randint(0, 1000, (rows,), generator=gen), torch.randint(0, 5, (rows,), generator=gen)


class _UNet(nn.Module):
    def __init__(self):
        super().__init__()
        from diffusers import UNet2DModel

        self.model = UNet2DModel(
            sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=4,
        )  # fmt: skip

    def forward(self, x, t):
        return self.model(x, t).sample


def _unet_inputs(rows, gen):
    return torch.randn(rows, 3, 8, 8, generator=gen, dtype=F64), torch.randint(0, 1000, (rows,), generator=gen)


class _Transformer2D(nn.Module):
    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from diffusers import Transformer2DModel

        self.model = Transformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=2)

    def forward(self, x):
        return self.model(x).sample


class _PixArt(nn.Module):
    def __init__(self, freeze_tables: bool):
        super().__init__()
        from diffusers import PixArtTransformer2DModel

        self.model = PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=1, sample_size=4,
            patch_size=2, cross_attention_dim=8, caption_channels=6, norm_num_groups=2,
        )  # fmt: skip
        self.freeze_tables = freeze_tables

    def forward(self, x, caption, t):
        extra = {"resolution": None, "aspect_ratio": None}
        return self.model(x, encoder_hidden_states=caption, timestep=t, added_cond_kwargs=extra).sample


def _pixart(freeze_tables):
    def build():
        model = randomize(_PixArt(freeze_tables))
        for name, p in model.named_parameters():
            if "scale_shift_table" in name and freeze_tables:
                p.requires_grad_(False)
        return model

    return build


def _pixart_inputs(rows, gen):
    x = torch.randn(rows, 4, 4, 4, generator=gen, dtype=F64)
    caption = torch.randn(rows, 3, 6, generator=gen, dtype=F64)
    return x, caption, torch.randint(0, 1000, (rows,), generator=gen)


# ----- attention and language models ---------------------------------------------------------------------------
def _ffn(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


class _DPEncoder(nn.Module):
    """Pre-norm encoder blocks around Opacus' DPMultiheadAttention, batch-first or sequence-first inside."""

    def __init__(self, batch_first: bool, d: int = 8, heads: int = 2, layers: int = 2):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.ModuleList(DPMultiheadAttention(d, heads, batch_first=batch_first) for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.mlp = nn.ModuleList(_ffn(d) for _ in range(layers))

    def forward(self, x):  # x: (N, T, d)
        h = x if self.batch_first else x.transpose(0, 1)
        for attn, norm, mlp in zip(self.attn, self.norm, self.mlp):
            y = norm(h)
            h = h + attn(y, y, y, need_weights=False)[0]
            h = h + mlp(h)
        return h if self.batch_first else h.transpose(0, 1)


class _TorchEncoder(nn.Module):
    """nn.TransformerEncoder whose attention is Opacus' DPMultiheadAttention (nn.MultiheadAttention is refused)."""

    def __init__(self, batch_first: bool, d: int = 8):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
        layer.self_attn = DPMultiheadAttention(d, 2, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.batch_first = batch_first

    def forward(self, x):
        h = x if self.batch_first else x.transpose(0, 1)
        h = self.encoder(h)
        return h if self.batch_first else h.transpose(0, 1)


class _GPT(nn.Module):
    """A two-block GPT: token and position embeddings, causal self-attention, an LM head (untied or tied)."""

    def __init__(self, tie: str = "none", vocab: int = 11, length: int = 6, d: int = 8, per_sample_positions=True):
        super().__init__()
        self.tie, self.per_sample_positions = tie, per_sample_positions
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.blocks = nn.ModuleList(_DPEncoder(batch_first=True, d=d, layers=1) for _ in range(2))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        pos = pos.expand_as(idx) if self.per_sample_positions else pos  # a (T,) index is batch-independent
        h = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        if self.tie == "functional":
            return h @ self.wte.weight.t()
        return self.head(h)


def _gpt(tie="none", per_sample_positions=True):
    def build():
        model = randomize(_GPT(tie, per_sample_positions=per_sample_positions))
        if tie == "module":
            model.head.weight = model.wte.weight
        return model

    return build


# ----- reuse, sharing, freezing ---------------------------------------------------------------------------------
class _Reused(nn.Module):
    """A Linear and an Embedding each applied twice per forward."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.out = nn.Embedding(7, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, idx):
        h = self.emb(idx) + self.emb((idx + 1) % 7)
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(h)))))


class _QKV(nn.Module):
    """q, k, v Linears fed one input (the shared-Gram path), some of their parameters frozen."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(6, 6) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return self.o(torch.softmax(q @ k.transpose(1, 2), -1) @ v)


def _qkv_partly_frozen():
    model = randomize(_QKV())
    model.k.bias.requires_grad_(False)
    model.v.weight.requires_grad_(False)
    return model


def _mlp(*layers):
    return lambda: randomize(nn.Sequential(*layers))


def _partly_frozen():
    model = randomize(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)))
    for p in model[0].parameters():
        p.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


class _OneInEval(nn.Module):
    """Dropout and a LayerNorm left in eval mode inside a model in train mode."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.drop, self.b = nn.Linear(5, 8), nn.LayerNorm(8), nn.Dropout(0.5), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.drop(self.norm(self.a(x))))


def _one_in_eval():
    model = randomize(_OneInEval())
    model.norm.eval()
    model.drop.eval()
    return model


def _with_dropout():
    return randomize(nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)))


class _BatchIndependent(nn.Module):
    """A Linear applied to a (T, f) table shared by every sample (as a position table would be)."""

    def __init__(self, length: int):
        super().__init__()
        self.register_buffer("table", torch.randn(length, 4, dtype=F64))
        self.proj, self.inp = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):  # x: (N, T, 4)
        return self.inp(x) + self.proj(self.table)


class _Checkpointed(nn.Module):
    """Activation checkpointing around a block of trainable layers."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.stem = nn.Linear(5, 5)
        self.block = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 8))
        self.head, self.reentrant = nn.Linear(8, 3), reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self.block, self.stem(x), use_reentrant=self.reentrant))


class _BatchReordered(nn.Module):
    """A Linear fed the batch with its rows reordered (then put back): rows no longer belong to their sample."""

    REORDER = {
        "roll": (lambda x: x.roll(1, 0), lambda h: h.roll(-1, 0)),  # commutes with a cyclic check permutation
        "flip": (lambda x: x.flip(0), lambda h: h.flip(0)),
    }

    def __init__(self, how: str):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)
        self.there, self.back = self.REORDER[how]

    def forward(self, x):
        return self.b(self.back(torch.tanh(self.a(self.there(x)))))


class _Expanded(nn.Module):
    """A Linear on ``x[:, None].expand(...)``: each sample's row repeated (rows stay in the sample's block)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x[:, None].expand(-1, 3, -1))).sum(1))


def _reparametrised(wrap):
    """A Linear whose weight is computed from other parameters by a pre-hook (weight_norm, spectral_norm)."""

    def build():
        model = randomize(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model[0] = wrap(model[0])
        return model.eval()  # spectral_norm's power iteration off: the reference sees the same weight

    return build


# ----- convolutions and norms -----------------------------------------------------------------------------------
def _conv2d(**kw):
    return _mlp(nn.Conv2d(4, 6, 3, **kw), nn.Tanh(), nn.Conv2d(6, 2, 1))


def _conv1d(**kw):
    return _mlp(nn.Conv1d(4, 6, 3, **kw), nn.Tanh(), nn.Conv1d(6, 2, 1))


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class _Recurrent(nn.Module):
    """Opacus' DPLSTM/DPGRU (2 layers, bidirectional): their cells' RNNLinear weights are re-registered on the RNN
    under nn.LSTM's names (aliases of one parameter on an ancestor)."""

    def __init__(self, cls, batch_first: bool):
        super().__init__()
        self.rnn = cls(3, 4, batch_first=batch_first, num_layers=2, bidirectional=True)
        self.head = nn.Linear(8, 2)
        self.batch_first = batch_first

    def forward(self, x):
        h, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.head(h if self.batch_first else h.transpose(0, 1))


class _AliasUsedByAncestor(nn.Module):
    """An ancestor registers its child's weight under another name and uses it in its own forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.alias = self.lin.weight

    def forward(self, x):
        return self.lin(x) + torch.tanh(x) @ self.alias.t()


CASES: list[Case] = [
    Case("dit_k1", _tiny_dit, _dit_inputs),
    Case("dit_k3", _tiny_dit, _dit_inputs, k=3),
    Case("unet2d", lambda: randomize(_UNet(), scale=0.2), _unet_inputs),
    Case("transformer2d", lambda: randomize(_Transformer2D()), _x(8, 4, 4)),
    Case("pixart_trainable_table", _pixart(False), _pixart_inputs, UnsupportedLayerError),
    Case("pixart_frozen_table", _pixart(True), _pixart_inputs),
    Case("dpmha_batch_first", lambda: randomize(_DPEncoder(True)), _x(5, 8)),
    Case("dpmha_seq_first", lambda: randomize(_DPEncoder(False)), _x(7, 8)),
    Case("dpmha_seq_first_len_eq_batch", lambda: randomize(_DPEncoder(False)), _x(5, 8)),  # T == R == 5
    Case("torch_encoder_batch_first", lambda: randomize(_TorchEncoder(True)), _x(5, 8)),
    Case("torch_encoder_seq_first", lambda: randomize(_TorchEncoder(False)), _x(5, 8)),
    Case("gpt_untied", _gpt(), _tokens(11, 6)),
    Case("gpt_tied_by_module", _gpt("module"), _tokens(11, 6), SharedParameterError),
    Case("gpt_tied_functionally", _gpt("functional"), _tokens(11, 6), CoverageError),
    Case("gpt_batch_independent_positions", _gpt(per_sample_positions=False), _tokens(11, 6), LayoutError),
    Case("linear_and_embedding_used_twice", lambda: randomize(_Reused()), _tokens(7, 3)),
    Case("qkv_shared_input_partly_frozen", _qkv_partly_frozen, _x(4, 6)),
    Case("partly_frozen", _partly_frozen, _x(5)),
    *(Case(f"conv2d_{m}", _conv2d(padding=1, padding_mode=m), _x(4, 5, 6)) for m in PADDING_MODES),
    *(Case(f"conv1d_{m}", _conv1d(padding=2, padding_mode=m), _x(4, 7)) for m in PADDING_MODES),
    Case("conv2d_groups_stride_dilation", _conv2d(padding=2, groups=2, stride=2, dilation=2), _x(4, 7, 7)),
    Case("conv2d_same_reflect", _conv2d(padding="same", padding_mode="reflect", dilation=(1, 2)), _x(4, 5, 6)),
    Case("conv2d_same_zeros_even_kernel", _mlp(nn.Conv2d(4, 4, 2, padding="same", groups=4)), _x(4, 5, 5)),
    Case("conv1d_groups_same", _conv1d(padding="same", groups=2), _x(4, 7)),
    Case("conv3d_opacus", _mlp(nn.Conv3d(2, 3, 2, padding=1)), _x(2, 3, 3, 3)),
    Case(
        "conv3d_reflect_refused",
        _mlp(nn.Conv3d(2, 3, 2, padding=1, padding_mode="reflect")),
        _x(2, 3, 3, 3),
        UnsupportedLayerError,
    ),  # fmt: skip
    Case("group_norm", _mlp(nn.Conv2d(4, 6, 1), nn.GroupNorm(3, 6), nn.Conv2d(6, 2, 1)), _x(4, 3, 3)),
    Case("rms_norm", _mlp(nn.Linear(5, 8), nn.RMSNorm(8), nn.Linear(8, 3)), _x(5)),
    Case("layer_norm_bias", _mlp(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)), _x(3, 5)),
    Case("layer_norm_no_bias", _mlp(nn.Linear(5, 8), nn.LayerNorm(8, bias=False), nn.Linear(8, 3)), _x(3, 5)),
    Case(
        "instance_norm_affine",
        _mlp(nn.Conv1d(3, 4, 1), nn.InstanceNorm1d(4, affine=True), nn.Conv1d(4, 2, 1)),
        _x(3, 6),
    ),  # fmt: skip
    Case("prelu_refused", _mlp(nn.Linear(5, 8), nn.PReLU(), nn.Linear(8, 3)), _x(5), UnsupportedLayerError),
    Case("eval_before_make_private", _with_dropout, _x(5), eval_before=True),
    Case("eval_after_make_private", _with_dropout, _x(5), eval_after=True),
    Case("one_submodule_in_eval", _one_in_eval, _x(5)),
    Case("checkpoint_non_reentrant", lambda: randomize(_Checkpointed(False)), _x(5)),
    Case("checkpoint_reentrant_refused", lambda: randomize(_Checkpointed(True)), _x(5), CoverageError),
    Case("linear_on_table_T_multiple_of_B", lambda: randomize(_BatchIndependent(10)), _x(10, 4), LayoutError),
    Case("linear_on_table_T_equal_B", lambda: randomize(_BatchIndependent(5)), _x(5, 4), LayoutError),
    Case("linear_on_rolled_batch", lambda: randomize(_BatchReordered("roll")), _x(5), LayoutError),
    Case("linear_on_flipped_batch", lambda: randomize(_BatchReordered("flip")), _x(5), LayoutError),
    Case("linear_on_expanded_batch", lambda: randomize(_Expanded()), _x(5)),
    Case("linear_on_4d_input", _mlp(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), _x(2, 3, 4)),
    Case(
        "conv1d_groups_dilation_stride_no_bias",
        _mlp(nn.Conv1d(4, 6, 3, groups=2, dilation=2, stride=2, bias=False), nn.Tanh(), nn.Conv1d(6, 2, 1)),
        _x(4, 11),
    ),  # fmt: skip
    Case("conv2d_channels_last", lambda: _conv2d(padding=1)().to(memory_format=torch.channels_last), _x(4, 5, 6)),
    Case("embedding_padding_idx", _mlp(nn.Embedding(7, 4, padding_idx=0), nn.Tanh(), nn.Linear(4, 3)), _tokens(3, 4)),
    Case(
        "layer_norm_no_affine", _mlp(nn.Linear(5, 8), nn.LayerNorm(8, elementwise_affine=False), nn.Linear(8, 3)), _x(5)
    ),
    Case(
        "group_norm_no_affine",
        _mlp(nn.Conv2d(4, 6, 1), nn.GroupNorm(3, 6, affine=False), nn.Conv2d(6, 2, 1)),
        _x(4, 3, 3),
    ),
    Case("weight_norm_refused", _reparametrised(nn.utils.weight_norm), _x(5), UnsupportedLayerError),
    Case("spectral_norm_refused", _reparametrised(nn.utils.spectral_norm), _x(5), UnsupportedLayerError),
    Case(
        "conv_transpose_refused",
        _mlp(nn.ConvTranspose1d(4, 6, 3), nn.Tanh(), nn.Conv1d(6, 2, 1)),
        _x(4, 5),
        UnsupportedLayerError,
    ),
    *(
        Case(
            f"{cls.__name__.lower()}_{'batch' if bf else 'seq'}_first",
            lambda c=cls, b=bf: randomize(_Recurrent(c, b)),
            _x(5, 3),
        )
        for cls in (DPLSTM, DPGRU)
        for bf in (True, False)
    ),  # fmt: skip
    Case("alias_used_by_ancestor", lambda: randomize(_AliasUsedByAncestor()), _x(5), CoverageError),
]


# ----- the harness shared by the soundness tests (eager and compiled) -------------------------------------------
N = 5  # samples per batch
MODES_UNDER_TEST = sorted(name for name, m in MODES.items() if not m.distributed)


def per_sample_criterion(k: int):
    def criterion(pred, target):
        return (pred - target).pow(2).flatten(1).mean(1).view(-1, k).mean(1)

    criterion.reduction = "mean"
    return criterion


def _rows(args, rows, sl):
    return tuple(a[sl] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == rows else a for a in args)


def _batch(case: Case):
    rows = N * case.k
    args = case.inputs(rows, torch.Generator().manual_seed(1))
    model = case.build()
    with torch.no_grad():
        out = model(*args)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    return model, args, target


def reference(model, args, target, k: int, max_grad_norm: float):
    """(update for SGD lr 1 with a mean loss, per-sample norms), one sample at a time."""
    crit, rows = per_sample_criterion(k), N * k

    def loss_of_sample(i):
        sl = slice(i * k, (i + 1) * k)
        return crit(model(*_rows(args, rows, sl)), target[sl])[0]

    grads = per_sample_gradients(model, loss_of_sample, N)
    return [g / N for g in clipped_sum(grads, max_grad_norm)], per_sample_norms(grads)


def dp_step(model, args, target, k, max_grad_norm, mode, *, eval_after=False, compile_kwargs=None):
    """One DP-SGD step (on a compiled DP model if ``compile_kwargs``); returns the update of every trainable param."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    loader = DataLoader(TensorDataset(torch.zeros(N)), batch_size=N)
    dp_model, dp_opt, crit, _ = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, criterion=per_sample_criterion(k),
        noise_multiplier=0.0, max_grad_norm=max_grad_norm, grad_sample_mode=mode, poisson_sampling=False,
    )  # fmt: skip
    if compile_kwargs is not None:
        dp_model.compile(**compile_kwargs)
    if eval_after:
        dp_model.eval()
    crit(dp_model(*args), target).backward()
    dp_opt.step()
    return [b - p.detach() for b, p in zip(before, params)]


def rel_err(got, want) -> float:
    num = torch.sqrt(sum((g - w).pow(2).sum() for g, w in zip(got, want)))
    return (num / torch.sqrt(sum(w.pow(2).sum() for w in want))).item()


def _expected(case: Case, cache: dict):
    """(model, args, target, C, reference update), computed once per case."""
    if case.name not in cache:
        model, args, target = _batch(case)
        modes = {m: m.training for m in model.modules()}
        if case.eval_before or case.eval_after:
            model.eval()  # the reference runs as the DP step will: in eval mode
        _, norms = reference(model, args, target, case.k, 1e12)
        max_grad_norm = norms.median().item()
        assert (norms > max_grad_norm * 1.01).any() and (norms < max_grad_norm * 0.99).any(), "C clips some"
        want, _ = reference(model, args, target, case.k, max_grad_norm)
        for m, training in modes.items():
            m.training = training
        if case.eval_before:
            model.eval()
        cache[case.name] = (model, args, target, max_grad_norm, want)
    return cache[case.name]
