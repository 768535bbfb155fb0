"""Experiment registry: name -> how to build (model, optimizer, one training step) for that training mode.

Entries: ``vanilla`` (no DP), two unmodified upstream Opacus baselines (``opacus_hooks``, ``opacus_ghost``) and
one entry per mode of ``memory_test.privacy.MODES`` (added automatically when the engine registers a mode).
Every entry shares the same step (``train_step.make_train_step``); what differs is only how the model, optimizer
and loss are prepared. Nothing here measures anything: the engine reports its own state (``stats()``), which
``measure`` reads through ``Prepared.engine``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from memory_test.diffusion.objective import EpsilonMSECriterion
from memory_test.privacy import MODES, DPGradSampleModule, Mode, resolve_mode


@dataclass
class RunContext:
    """What a setup function needs; built by ``measure`` from the validated config."""

    device: torch.device
    batch_size: int
    noise_multiplicity: int
    noise_multiplier: float
    max_grad_norm: float
    optimizer: str
    lr: float
    seed: int


@dataclass
class Prepared:
    """A ready-to-train experiment."""

    model: nn.Module  # what is called in the step (possibly an Opacus/engine wrapper)
    optimizer: torch.optim.Optimizer
    loss_fn: Callable  # (pred, eps) -> object with .backward()
    base_optimizer: torch.optim.Optimizer  # the torch optimizer holding the state (inside a DPOptimizer)
    # This package's engine (its public stats() and reset_peaks()); None for vanilla and upstream Opacus.
    engine: DPGradSampleModule | None = None
    dp_state_bytes: Callable[[], int | None] = lambda: None  # DP-only memory (norms, caches) at its peak
    dp_state_source: str | None = None
    dp_state_overlaps: bool = False  # True: the DP state shares storage with activations (not additive)
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    name: str
    family: str  # "baseline" | "upstream_opacus" | "engine"
    description: str
    private: bool
    prepare: Callable[[nn.Module, RunContext], Prepared]
    supports_noise_multiplicity: bool = True
    distributed: bool = False
    mode: Mode | None = None


EXPERIMENTS: dict[str, Experiment] = {}


def register(exp: Experiment) -> Experiment:
    if exp.name in EXPERIMENTS:
        raise ValueError(f"experiment {exp.name!r} registered twice")
    EXPERIMENTS[exp.name] = exp
    return exp


# ----- shared pieces ----------------------------------------------------------------------------------------

OPTIMIZERS = {
    # DiT trains with AdamW, lr 1e-4, no weight decay.
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.0),
}


def _optimizer(model: nn.Module, ctx: RunContext) -> torch.optim.Optimizer:
    return OPTIMIZERS[ctx.optimizer]([p for p in model.parameters() if p.requires_grad], ctx.lr)


def _fixed_loader(ctx: RunContext) -> torch.utils.data.DataLoader:
    """A one-batch loader of B samples: make_private derives the expected batch B (noise scale 1/B) from it.

    Nothing iterates it; the benchmark feeds its own fixed batch. Its sampling rate (1.0) is not the one the
    reported ε assumes; ``privacy_block`` computes ε for q = B / dataset_size itself.
    """
    data = torch.utils.data.TensorDataset(torch.zeros(ctx.batch_size, 1))
    return torch.utils.data.DataLoader(data, batch_size=ctx.batch_size)


def _noise_generator(ctx: RunContext) -> torch.Generator:
    return torch.Generator(device=ctx.device).manual_seed(ctx.seed + 1)


def _mean_of(criterion: EpsilonMSECriterion) -> Callable:
    return lambda pred, eps: criterion(pred, eps).mean()


# ----- vanilla ----------------------------------------------------------------------------------------------


def prepare_vanilla(model: nn.Module, ctx: RunContext) -> Prepared:
    opt = _optimizer(model, ctx)
    return Prepared(model, opt, _mean_of(EpsilonMSECriterion(ctx.noise_multiplicity)), opt)


# ----- upstream Opacus baselines ----------------------------------------------------------------------------


def prepare_opacus_hooks(model: nn.Module, ctx: RunContext) -> Prepared:
    """pip Opacus, grad_sample_mode='hooks': materialised per-sample gradients (rows x params), then clipping."""
    import opacus

    opt = _optimizer(model, ctx)
    dp_model, dp_opt, _ = opacus.PrivacyEngine().make_private(
        module=model,
        optimizer=opt,
        data_loader=_fixed_loader(ctx),
        noise_multiplier=ctx.noise_multiplier,
        max_grad_norm=ctx.max_grad_norm,
        grad_sample_mode="hooks",
        poisson_sampling=False,
        noise_generator=_noise_generator(ctx),
    )
    rows = ctx.batch_size * ctx.noise_multiplicity
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return Prepared(
        dp_model,
        dp_opt,
        _mean_of(EpsilonMSECriterion(ctx.noise_multiplicity)),
        opt,
        dp_state_bytes=lambda: rows * trainable_bytes,
        dp_state_source="derived: per-sample gradients p.grad_sample = rows x trainable parameter bytes",
    )


def freeze_block0_embedder(model: nn.Module) -> list[str]:
    """Freeze the timestep/label embedder of DiT block 0 (diffusers calls it twice per forward).

    Upstream Opacus ghost clipping cannot handle a module used twice in one forward; diffusers'
    DiTTransformer2DModel reuses ``transformer_blocks[0].norm1.emb`` for the final layer's conditioning.
    Returns the names of the parameters frozen.
    """
    for prefix, mod in model.named_modules():
        blocks = getattr(mod, "transformer_blocks", None)
        if blocks is None or not len(blocks):
            continue
        emb = getattr(getattr(blocks[0], "norm1", None), "emb", None)
        if emb is None:
            continue
        stem = f"{prefix}.transformer_blocks.0.norm1.emb" if prefix else "transformer_blocks.0.norm1.emb"
        frozen = []
        for name, p in emb.named_parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(f"{stem}.{name}")
        return frozen
    raise RuntimeError("no DiT transformer_blocks[0].norm1.emb found: cannot apply the opacus_ghost workaround")


def prepare_opacus_ghost(model: nn.Module, ctx: RunContext) -> Prepared:
    """pip Opacus, grad_sample_mode='ghost' (two backward passes); block 0's embedder frozen so it can run."""
    import opacus

    frozen = freeze_block0_embedder(model)
    n_frozen = sum(p.numel() for n, p in model.named_parameters() if n in set(frozen))
    opt = _optimizer(model, ctx)
    dp_model, dp_opt, dp_loss, _ = opacus.PrivacyEngine().make_private(
        module=model,
        optimizer=opt,
        data_loader=_fixed_loader(ctx),
        criterion=EpsilonMSECriterion(1),
        noise_multiplier=ctx.noise_multiplier,
        max_grad_norm=ctx.max_grad_norm,
        grad_sample_mode="ghost",
        poisson_sampling=False,
        noise_generator=_noise_generator(ctx),
    )
    notes = {
        "frozen_for_baseline": frozen,
        "frozen_for_baseline_params": n_frozen,
        "why_frozen": "upstream Opacus ghost clipping does not support a module used twice per forward; "
        "diffusers reuses transformer_blocks[0].norm1.emb, so it is frozen (not trained) in this baseline",
    }
    return Prepared(dp_model, dp_opt, dp_loss, opt, notes=notes)


# ----- this package's engine --------------------------------------------------------------------------------


def prepare_engine(mode: Mode, model: nn.Module, ctx: RunContext) -> Prepared:
    from memory_test.privacy import PrivacyEngine

    opt = _optimizer(model, ctx)
    dp_model, dp_opt, dp_loss, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=opt,
        data_loader=_fixed_loader(ctx),
        criterion=EpsilonMSECriterion(ctx.noise_multiplicity),
        noise_multiplier=ctx.noise_multiplier,
        max_grad_norm=ctx.max_grad_norm,
        grad_sample_mode=mode.name,
        poisson_sampling=False,
        noise_generator=_noise_generator(ctx),
    )
    return Prepared(
        dp_model,
        dp_opt,
        dp_loss,
        opt,
        engine=dp_model,
        dp_state_bytes=lambda: dp_model.stats().cache_peak_bytes,
        dp_state_source="measured by the engine: stats().cache_peak_bytes, peak storage referenced by its caches "
        "(layer inputs, partly the same tensors autograd saves, and output gradients); the remainder excludes it",
        dp_state_overlaps=True,
    )


def backends_of(prepared: Prepared) -> dict:
    """The engine's kernel backend and each layer's norm path (from its public stats); nulls for other models."""
    if prepared.engine is None:
        return {"kernel_backend": None, "norm_paths_by_layer": None, "norm_path_counts": None}
    stats = prepared.engine.stats()
    out = {
        "kernel_backend": stats.kernel_backend,
        "norm_paths_by_layer": dict(stats.norm_paths),
        "norm_path_counts": stats.norm_path_counts,
    }
    if stats.flash_tf32_rounding is not None:
        out["flash_tf32_rounding"] = stats.flash_tf32_rounding
    return out


def norm_error_margin_of(prepared: Prepared) -> dict | None:
    """The engine's clipping margins of the last step (None: not this package's engine, or not reported)."""
    return None if prepared.engine is None else prepared.engine.stats().norm_error_margin


# ----- registry ---------------------------------------------------------------------------------------------

register(Experiment("vanilla", "baseline", "No DP: plain AdamW training (the reference).", False, prepare_vanilla))
register(
    Experiment(
        "opacus_hooks",
        "upstream_opacus",
        "Unmodified pip Opacus grad_sample_mode='hooks': per-sample gradients materialised, then clipped.",
        True,
        prepare_opacus_hooks,
        supports_noise_multiplicity=False,
    )
)
register(
    Experiment(
        "opacus_ghost",
        "upstream_opacus",
        "Unmodified pip Opacus ghost clipping; DiT block 0's embedder frozen (reused module, unsupported upstream).",
        True,
        prepare_opacus_ghost,
        supports_noise_multiplicity=False,
    )
)
for _mode in MODES.values():
    register(
        Experiment(
            _mode.name,
            "engine",
            _mode.description or f"memory_test.privacy mode {_mode.name!r}",
            True,
            lambda model, ctx, _m=_mode: prepare_engine(_m, model, ctx),
            supports_noise_multiplicity=True,
            distributed=_mode.distributed,
            mode=_mode,
        )
    )


def experiment_names(include_aliases: bool = True) -> list[str]:
    """Every name accepted by --experiment: registry names, then the engine's aliases."""
    names = list(EXPERIMENTS)
    if include_aliases:
        names += sorted(a for m in MODES.values() for a in m.aliases if a not in EXPERIMENTS)
    return names


def resolve_experiment(name: str) -> Experiment:
    """The experiment for a registry name or an engine alias; ValueError listing valid names otherwise."""
    if name in EXPERIMENTS:
        return EXPERIMENTS[name]
    try:
        return EXPERIMENTS[resolve_mode(name).name]
    except (ValueError, KeyError):
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(experiment_names())}") from None


def single_device_experiments() -> list[str]:
    return [n for n, e in EXPERIMENTS.items() if not e.distributed]


def sharded_experiments() -> list[str]:
    return [n for n, e in EXPERIMENTS.items() if e.distributed]
