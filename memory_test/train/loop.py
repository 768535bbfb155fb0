"""The training loop: epochs of logical (Poisson) batches, each run as physical batches; the ledger after each epoch.

``Progress`` is everything a checkpoint must restore besides weights, optimizer, accountant and generators: where
in which epoch the run is, the epoch's loss so far, and the per-epoch history. Resuming from a checkpoint taken at
any point continues exactly: same accountant history, same weights, same per-epoch loss as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from tqdm import tqdm

from memory_test.diffusion.objective import EpsilonMSECriterion, make_noisy_batch
from memory_test.train.checkpoint import CHECKPOINT_FORMAT, rng_state, run_settings, save_checkpoint, set_rng_state


@dataclass
class PrivateRun:
    """The made-private objects of one run and the settings the loop reads."""

    args: argparse.Namespace
    model: torch.nn.Module  # the engine's wrapped model
    optimizer: torch.optim.Optimizer
    criterion: EpsilonMSECriterion
    loader: torch.utils.data.DataLoader
    engine: object  # memory_test.privacy.PrivacyEngine: its accountant is the ledger
    privacy: dict
    device: torch.device
    noise_gen: torch.Generator  # t and ε of the diffusion objective
    trainable: list
    probe: tuple  # (latents, labels) of the fixed loss probe

    @property
    def steps(self) -> int:
        return ledger_steps(self.engine.accountant)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def max_steps_reached(self) -> bool:
        return self.args.max_steps is not None and self.steps >= self.args.max_steps


@dataclass
class Progress:
    epoch: int = 0
    step_in_epoch: int = 0
    history: list = field(default_factory=list)
    # The epoch's loss so far: restored from a mid-epoch checkpoint, so the epoch's train_loss counts every batch.
    loss_sum: float = 0.0
    loss_n: int = 0

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> Progress:
        epoch, step_in_epoch = ckpt["progress"]["epoch"], ckpt["progress"]["step_in_epoch"]
        loss = ckpt.get("epoch_loss", {}) if step_in_epoch > 0 else {}  # older checkpoints lack it
        history = [dict(h) for h in ckpt["history"]]
        return cls(epoch, step_in_epoch, history, loss.get("sum", 0.0), loss.get("n", 0))


def ledger_steps(accountant) -> int:
    """Noisy steps recorded by an Opacus accountant (history entries are (σ, q, steps))."""
    return sum(entry[-1] for entry in accountant.history)


def epsilon_spent(engine, delta: float, sigma: float) -> float:
    """ε of the ledger so far; infinite when no noise is added (σ = 0), where no accountant may put a number on it."""
    if sigma == 0:
        return math.inf
    return float(engine.get_epsilon(delta)) if ledger_steps(engine.accountant) else 0.0


@torch.no_grad()
def probe_loss(model, latents, labels, K: int, device, seed: int) -> float:
    """Diffusion loss on a fixed subset with fixed (t, ε), labels kept: comparable across steps."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    x_t, t, y, eps = make_noisy_batch(latents.to(device), labels.to(device), K, generator=gen)
    pred = torch.cat([model(x_t[i : i + 256], t[i : i + 256], y[i : i + 256]) for i in range(0, len(x_t), 256)])
    model.train(was_training)
    return EpsilonMSECriterion(K)(pred, eps).mean().item()


def run_probe(run: PrivateRun) -> float:
    return probe_loss(run.model, *run.probe, run.args.noise_multiplicity, run.device, run.args.seed + 3)


def save(run: PrivateRun, progress: Progress) -> None:
    """A checkpoint of everything a resume needs (nothing when no --checkpoint was given)."""
    if not run.args.checkpoint:
        return
    save_checkpoint(
        run.args.checkpoint,
        {
            "format": CHECKPOINT_FORMAT,
            "model": run.model._module.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "accountant": run.engine.accountant.state_dict(),
            "privacy": run.privacy,
            "run": run_settings(run.args),
            "progress": {"epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch, "global_step": run.steps},
            "epoch_loss": {"sum": progress.loss_sum, "n": progress.loss_n},
            "rng": rng_state(run.noise_gen),
            "history": progress.history,
        },
    )


def train_epochs(run: PrivateRun, progress: Progress, ckpt: dict | None) -> None:
    """Every remaining epoch (or until --max-steps), a checkpoint after each."""
    args = run.args
    if ckpt is None and args.probe_size:
        progress.history.append({"epoch": 0, "step": 0, "epsilon": 0.0, "probe_loss": run_probe(run)})
    bar = tqdm(total=args.epochs * run.steps_per_epoch, initial=run.steps, unit="step", disable=args.no_progress)
    stopped = run.max_steps_reached()
    while progress.epoch < args.epochs and not stopped:
        stopped = run_epoch(run, progress, ckpt, bar)
        ckpt = None
        if progress.step_in_epoch == run.steps_per_epoch:
            end_epoch(run, progress, bar)
        save(run, progress)
    bar.close()


def run_epoch(run: PrivateRun, progress: Progress, ckpt: dict | None, bar) -> bool:
    """The rest of the current epoch; True if --max-steps stopped it."""
    args = run.args
    with BatchMemoryManager(
        data_loader=run.loader, max_physical_batch_size=args.physical_batch_size, optimizer=run.optimizer
    ) as physical_loader:
        # Creating a DataLoader iterator draws its base seed from the global generator. A checkpoint taken at an
        # epoch boundary precedes that draw, one taken mid-epoch follows it: restore on the same side of it.
        if ckpt is not None and progress.step_in_epoch == 0:
            set_rng_state(ckpt["rng"], run.noise_gen)
        batches = iter(physical_loader)
        if ckpt is not None and progress.step_in_epoch > 0:
            set_rng_state(ckpt["rng"], run.noise_gen)
        while progress.step_in_epoch < run.steps_per_epoch:
            if not physical_step(run, progress, next(batches)):
                continue  # a physical batch inside a logical one: no step taken yet
            progress.step_in_epoch += 1
            bar.update(1)
            bar.set_postfix(loss=f"{progress.loss_sum / max(progress.loss_n, 1):.4f}")
            if run.max_steps_reached():
                return True
            every = args.checkpoint_every
            if every and run.steps % every == 0 and progress.step_in_epoch < run.steps_per_epoch:
                save(run, progress)
    return False


def physical_step(run: PrivateRun, progress: Progress, batch) -> bool:
    """One physical batch (forward, backward, optimizer call); True when it completed a logical (noisy) step."""
    before = run.steps
    x0, y = batch
    if len(x0) == 0:  # an empty Poisson batch still takes a (noise-only) step
        for p in run.trainable:
            p.grad = torch.zeros_like(p)
    else:
        K = run.args.noise_multiplicity
        x_t, t, y_rep, eps = make_noisy_batch(x0.to(run.device), y.to(run.device), K, generator=run.noise_gen)
        loss = run.criterion(run.model(x_t, t, y_rep), eps)
        loss.backward()
        progress.loss_sum += loss.loss_per_sample.detach().sum().item()
        progress.loss_n += len(x0)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return run.steps != before


def end_epoch(run: PrivateRun, progress: Progress, bar) -> None:
    """The epoch's ledger line: step, ε so far, the epoch's mean loss and the probe loss."""
    progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
    record = {
        "epoch": progress.epoch,
        "step": run.steps,
        "epsilon": epsilon_spent(run.engine, run.args.delta, run.privacy["noise_multiplier"]),
        "train_loss": progress.loss_sum / max(progress.loss_n, 1),
    }
    progress.loss_sum, progress.loss_n = 0.0, 0
    if run.args.probe_size:
        record["probe_loss"] = run_probe(run)
    progress.history.append(record)
    bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
