"""``PrivacyEngine``: Opacus' engine extended with this package's clipping modes (subclass, no patching)."""

from __future__ import annotations

import math
import os
import warnings
from itertools import chain

import opacus
import torch
from opacus.validators import ModuleValidator
from torch import nn

from .errors import PrivacyConfigError
from .fsdp import FSDPDPGradSampleModule
from .grad_sample_module import DPGradSampleModule
from .loss import DPLoss
from .modes import BOOKKEEPING, MODES, UPSTREAM_PASSTHROUGH, Mode, resolve_mode
from .norm_backends import NORM_BACKENDS
from .optimizer import FusedDPOptimizer, GuardedFSDPOptimizer
from .validation import check_privacy_parameters, check_target

# Mode.sharding -> the wrapped-model class that implements it.
GSM_CLASSES = {None: DPGradSampleModule, "fsdp": FSDPDPGradSampleModule}


class PrivacyEngine(opacus.PrivacyEngine):
    """Opacus PrivacyEngine whose ``make_private`` also accepts the modes of ``memory_test.privacy.MODES``.

    For every mode (upstream ``hooks`` included) it returns ``(model, optimizer, criterion, data_loader)``;
    ``criterion(...)`` gives a loss whose ``.backward()`` does the mode's clipping, and ``optimizer.step()``
    adds Opacus' noise (std sigma*C per parameter, then the 1/expected-batch scaling) and steps.
    """

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: torch.utils.data.DataLoader,
        criterion,
        noise_multiplier: float,
        max_grad_norm: float,
        grad_sample_mode: str = "hooks",
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator=None,
        batch_first: bool = True,
        rand_on_empty: bool = False,
        **kwargs,
    ):
        check_privacy_parameters(noise_multiplier, max_grad_norm)
        if noise_multiplier == 0:
            warnings.warn("noise_multiplier=0: this run adds no noise and is not private (epsilon = inf)", stacklevel=2)
        if grad_sample_mode in UPSTREAM_PASSTHROUGH:
            dp_loss = DPLoss(criterion, module=None, strategy="upstream_hooks", loss_reduction=loss_reduction)
            model, optimizer, data_loader = super().make_private(
                module=module,
                optimizer=optimizer,
                data_loader=data_loader,
                criterion=criterion,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                grad_sample_mode=grad_sample_mode,
                loss_reduction=loss_reduction,
                poisson_sampling=poisson_sampling,
                clipping=clipping,
                noise_generator=noise_generator,
                batch_first=batch_first,
                rand_on_empty=rand_on_empty,
                **kwargs,
            )
            dp_loss.module = model
            return model, optimizer, dp_loss, data_loader

        mode = resolve_mode(grad_sample_mode)
        dp_loss = DPLoss(criterion, module=None, strategy=mode.strategy, loss_reduction=loss_reduction)
        if clipping != "flat":
            raise PrivacyConfigError(f"mode {mode.name!r} supports clipping='flat' only, got {clipping!r}")
        if kwargs.pop("wrap_model", True) is False:
            raise PrivacyConfigError(f"mode {mode.name!r} needs wrap_model=True")
        if noise_generator is not None and self.secure_mode:
            raise ValueError("Passing seed is prohibited in secure mode")
        _check_optimizer_params(module, optimizer)
        distributed = _check_distributed(mode)

        model = self._prepare_dp_module(
            module, mode, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction, batch_first=batch_first
        )
        data_loader = self._prepare_data_loader(
            data_loader,
            distributed=distributed,
            poisson_sampling=poisson_sampling,
            batch_first=batch_first,
            rand_on_empty=rand_on_empty,
        )
        sample_rate = 1 / len(data_loader)
        expected_batch_size = int(len(data_loader.dataset) * sample_rate)
        if distributed:  # Opacus' convention: the optimizer's expected batch is per worker
            expected_batch_size /= torch.distributed.get_world_size()
        # Our loss object leaves Σ_i c_i g_i in p.grad, exactly what Opacus' fast-gradient-clipping optimizer
        # expects; it then adds noise and scales as for upstream ghost clipping.
        optimizer = self._prepare_optimizer(
            optimizer=optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            noise_generator=noise_generator,
            distributed=distributed,
            clipping=clipping,
            grad_sample_mode="ghost_fsdp" if distributed else "ghost",
            **kwargs,
        )
        optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        optimizer.health = model.step_health
        dp_loss.module = model
        return model, optimizer, dp_loss, data_loader

    def make_private_with_epsilon(self, *args, target_epsilon, target_delta, **kwargs):
        """Opacus' ``make_private_with_epsilon`` with epsilon and delta validated first (sigma comes from them)."""
        check_target(target_epsilon, target_delta)
        return super().make_private_with_epsilon(
            *args, target_epsilon=target_epsilon, target_delta=target_delta, **kwargs
        )

    def get_epsilon(self, delta):
        """Epsilon spent so far; infinite once any step ran without noise (noise_multiplier = 0)."""
        if any(entry[0] == 0 for entry in getattr(self.accountant, "history", [])):
            return math.inf
        return super().get_epsilon(delta)

    def _prepare_optimizer(
        self, *, optimizer, grad_sample_mode="hooks", distributed=False, clipping="flat", noise_generator=None, **kwargs
    ):
        """Our modes get FusedDPOptimizer (single process) or GuardedFSDPOptimizer (sharded)."""
        if grad_sample_mode == "ghost_fsdp" and distributed and clipping == "flat":
            generator = self.secure_rng if self.secure_mode else noise_generator
            return GuardedFSDPOptimizer(optimizer, generator=generator, secure_mode=self.secure_mode, **kwargs)
        if grad_sample_mode != "ghost" or distributed or clipping != "flat":
            return super()._prepare_optimizer(
                optimizer=optimizer,
                grad_sample_mode=grad_sample_mode,
                distributed=distributed,
                clipping=clipping,
                noise_generator=noise_generator,
                **kwargs,
            )
        generator = self.secure_rng if self.secure_mode else noise_generator
        return FusedDPOptimizer(optimizer, generator=generator, secure_mode=self.secure_mode, **kwargs)

    def _prepare_dp_module(self, module: nn.Module, mode: Mode, *, max_grad_norm, loss_reduction, batch_first):
        if isinstance(module, opacus.grad_sample.AbstractGradSampleModule):
            raise PrivacyConfigError("pass the plain nn.Module to make_private, not an already wrapped one")
        _validate_module(module)
        return GSM_CLASSES[mode.sharding](
            module,
            norm_backend=NORM_BACKENDS[mode.norm](),
            keep_for_bookkeeping=mode.strategy == BOOKKEEPING,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            max_grad_norm=max_grad_norm,
        )


def _validate_module(module: nn.Module) -> None:
    """Opacus' module validators, except its train-mode requirement (the engine records norms in eval mode too)."""
    errors = [e for e in ModuleValidator.validate(module, strict=False) if "training mode" not in str(e)]
    if errors:
        raise PrivacyConfigError(
            "modules incompatible with per-sample clipping: "
            + "; ".join(str(e) for e in errors)
            + ". opacus.validators.ModuleValidator.fix(model) replaces most of them (e.g. BatchNorm by GroupNorm)."
        )


def _check_optimizer_params(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model_parameters = set(module.parameters())
    optimized = set(chain.from_iterable(group["params"] for group in optimizer.param_groups))
    if not optimized <= model_parameters:
        raise ValueError("Module parameters are different than optimizer Parameters")
    # A trainable parameter the optimizer never updates still counts in each sample's norm: every other parameter
    # would be clipped harder than the reference (which clips what is trained), with no error.
    left_out = [name for name, p in module.named_parameters() if p.requires_grad and p not in optimized]
    if left_out:
        raise PrivacyConfigError(
            f"trainable parameters not in the optimizer: {', '.join(left_out[:5])}"
            + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
            + ". Their per-sample gradients would count in the clipping norm without ever being trained: freeze "
            "them (requires_grad_(False)) before make_private, or give them to the optimizer."
        )


def _check_distributed(mode: Mode) -> bool:
    """Sharded modes need torchrun with several processes; single-device modes must not silently run sharded."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not mode.distributed:
        if initialised and torch.distributed.get_world_size() > 1:
            # Each rank would clip, noise and step on its own samples with no synchronisation.
            raise PrivacyConfigError(
                f"mode {mode.name!r} is single-process but torch.distributed runs "
                f"{torch.distributed.get_world_size()} processes: use a sharded mode ("
                + ", ".join(sorted(n for n, m in MODES.items() if m.distributed))
                + ") or launch one process"
            )
        return False
    if not initialised:
        raise PrivacyConfigError(
            f"mode {mode.name!r} shards the model over GPUs: launch with `torchrun --nproc-per-node=N ...` and "
            "initialise torch.distributed first. Single-process modes: "
            + ", ".join(sorted(n for n, m in MODES.items() if not m.distributed))
        )
    world = torch.distributed.get_world_size()
    if world < 2:  # one process would be a single-GPU run under a sharded name
        raise PrivacyConfigError(
            f"mode {mode.name!r} shards over processes but the world size is 1: launch with "
            "`torchrun --nproc-per-node=N` (N >= 2), or use a single-process mode"
        )
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if torch.distributed.get_backend() == "nccl" and local_world > torch.cuda.device_count():
        raise PrivacyConfigError(
            f"mode {mode.name!r}: {local_world} processes on this node but only {torch.cuda.device_count()} "
            "visible GPU(s); use --nproc-per-node <= the number of GPUs"
        )
    return True
