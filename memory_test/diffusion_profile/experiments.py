"""Experiment registry: name -> how to build (model, optimizer, one training step) for that training mode.

Entries: ``vanilla`` (no DP), two unmodified upstream Opacus baselines (``opacus_hooks``, ``opacus_ghost``) and
one entry per mode of ``memory_test.privacy.MODES`` (added automatically when the engine registers a mode).
Every entry shares the same step: draw (t, ε) for the fixed batch, noise it (DiT's epsilon objective from
``memory_test.diffusion.objective``), forward, per-sample loss, backward, ``optimizer.step()``, ``zero_grad()``.
What differs is only how the model, optimizer and loss are prepared. Nothing here measures anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from memory_test.diffusion.objective import EpsilonMSECriterion, NoiseSchedule, make_noisy_batch
from memory_test.privacy import MODES, Mode, resolve_mode


@dataclass
class RunContext:
    """What a setup function needs; built by single_experiment.py from the validated config."""

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
    dp_state_bytes: Callable[[], int | None] = lambda: None  # DP-only memory (norms, caches) at its peak
    dp_state_source: str | None = None
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
    reported ε assumes; single_experiment.py computes ε for q = B / dataset_size itself.
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
    has_counter = hasattr(dp_model, "dp_cache_peak_bytes")
    return Prepared(
        dp_model,
        dp_opt,
        dp_loss,
        opt,
        dp_state_bytes=(lambda: int(dp_model.dp_cache_peak_bytes)) if has_counter else (lambda: None),
        dp_state_source="measured by the engine: dp_cache_peak_bytes, peak storage referenced by its caches (layer "
        "inputs, partly the same tensors autograd saves, and output gradients); the remainder excludes it"
        if has_counter
        else None,
    )


def reset_dp_state_peak(model: nn.Module) -> bool:
    """Reset the engine's cache peak counter so it covers the measured steps only; False if it cannot be reset.

    (Every step does the same work, so a counter that also covers warm-up reports the same peak.)
    """
    reset = getattr(model, "reset_dp_cache_peak", None)
    if callable(reset):
        reset()
        return True
    try:
        if isinstance(getattr(model, "dp_cache_peak_bytes", None), int):
            model.dp_cache_peak_bytes = 0
            return True
    except AttributeError:  # a read-only property
        pass
    return False


def dp_backend_info(model: nn.Module) -> dict:
    """Which per-sample norm path each layer took and which kernel backend ran (as far as the engine says)."""
    kernel = getattr(model, "kernel_backend", None)
    if callable(kernel):
        try:
            kernel = kernel()
        except Exception as e:  # informational only
            kernel = f"unknown ({e})"
    paths = getattr(model, "norm_paths", None)
    out = {"kernel_backend": kernel, "norm_paths_by_layer": None, "norm_path_counts": None}
    if kernel == "triton":  # fp32 TF32 dots: operands rounded to nearest TF32, or truncated by the tensor cores
        from memory_test.kernels.flash_norms import tf32_rounding

        out["flash_tf32_rounding"] = tf32_rounding()
    if isinstance(paths, dict):
        out["norm_paths_by_layer"] = dict(paths)
        counts: dict[str, int] = {}
        for p in paths.values():
            counts[str(p)] = counts.get(str(p), 0) + 1
        out["norm_path_counts"] = counts
    return out


def dp_norm_error_margin(model: nn.Module) -> dict | None:
    """The engine's clipping margins of the last step (rule, coefficient slack, error budget per norm path and
    precision: ``DPGradSampleModule.norm_error_margin``); None for models the engine did not wrap."""
    margin = getattr(model, "norm_error_margin", None)
    return dict(margin) if isinstance(margin, dict) else None


# ----- the training step shared by all entries ---------------------------------------------------------------


def make_train_step(
    prepared: Prepared,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    noise_multiplicity: int,
    autocast_dtype: torch.dtype | None,
    seed: int,
) -> Callable[[], torch.Tensor]:
    """One DP-SGD (or plain) step on the fixed batch; returns the detached mean loss. No host synchronisation."""
    device = x0.device
    schedule = NoiseSchedule()
    schedule.alphas_cumprod = schedule.alphas_cumprod.to(device)  # no host->device copy inside the step
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    model, opt, loss_fn = prepared.model, prepared.optimizer, prepared.loss_fn

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    def step() -> torch.Tensor:
        x_t, t, y, eps = make_noisy_batch(x0, labels, noise_multiplicity, generator=gen, schedule=schedule)
        with autocast():
            pred = model(x_t, t, y)
        loss = loss_fn(pred, eps)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


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
