"""DP-SGD training of a DiT on pre-computed VAE latents: any registry mode, Poisson sampling, an (ε, δ) ledger,
resume. ``python -m memory_test.train`` (or the old path ``python -m memory_test.diffusion_profile.train_dp``).

Example (see docs/TRAIN_DP.md):
    python -m memory_test.diffusion.latent_dataset --images data/train --out latents.safetensors --image-size 256
    python -m memory_test.train --latents latents.safetensors --model DiT-XL/2 \
        --mode flash_bk --batch-size 1024 --physical-batch-size 32 --epochs 10 --target-epsilon 8 --delta 1e-6 \
        --noise-multiplicity 4 --checkpoint ckpt.pt --resume
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.data import DataLoader

from memory_test.cli_common.errors import run_tool
from memory_test.cli_common.files import atomic_write_json
from memory_test.diffusion.objective import EpsilonMSECriterion
from memory_test.privacy import PrivacyEngine
from memory_test.privacy.errors import PrivacyConfigError
from memory_test.train.args import TOOL, check_args, parse_args, resolve_train_device
from memory_test.train.checkpoint import check_resume, checkpoint_to_resume, load_model_state, privacy_settings
from memory_test.train.data import (
    build_model,
    check_batch_fits,
    check_dataset,
    check_model_fits,
    open_latents,
    probe_batch,
)
from memory_test.train.loop import PrivateRun, Progress, epsilon_spent, ledger_steps, train_epochs

NON_PRIVATE_NOTE = "noise_multiplier 0 (--non-private): no noise was added, so there is no privacy; ε is infinite"


def train(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Run (or resume) private training; returns the summary also written to --metrics-out.

    Every input is checked before any work; a bad one raises ToolError (main turns it into one line, exit 2).
    """
    check_args(args, argv)
    device = resolve_train_device(args.device)
    dataset = open_latents(args.latents)
    check_dataset(dataset, args.delta)
    check_batch_fits(dataset, args.batch_size)
    check_model_fits(args.model, dataset)
    ckpt = checkpoint_to_resume(args)
    privacy = privacy_settings(args, dataset)
    if ckpt is not None:
        check_resume(ckpt, privacy, args)
    run = make_private_run(args, dataset, privacy, device, ckpt)
    progress = Progress.from_checkpoint(ckpt) if ckpt is not None else Progress()
    train_epochs(run, progress, ckpt)
    return finish(run, progress.history, finished=progress.epoch >= args.epochs)


def make_private_run(args, dataset, privacy: dict, device, ckpt: dict | None) -> PrivateRun:
    """The model (restored from ``ckpt``), AdamW, and the engine's private versions of them; σ from the target ε
    when one is given. The ledger's sampling rate must be the engine's."""
    torch.manual_seed(args.seed)
    model = build_model(args, dataset).to(device).train()
    if ckpt is not None:
        load_model_state(model, ckpt, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = PrivacyEngine(accountant=args.accountant)
    common = dict(
        module=model,
        optimizer=torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0),
        data_loader=DataLoader(dataset, batch_size=args.batch_size),
        criterion=EpsilonMSECriterion(args.noise_multiplicity),
        max_grad_norm=args.max_grad_norm,
        grad_sample_mode=args.mode,
        poisson_sampling=True,
    )
    if privacy["noise_multiplier"] is None:
        model, optimizer, criterion, loader = engine.make_private_with_epsilon(
            **common, target_epsilon=args.target_epsilon, target_delta=args.delta, epochs=args.epochs
        )
        privacy["noise_multiplier"] = float(optimizer.noise_multiplier)
    else:
        model, optimizer, criterion, loader = engine.make_private(
            **common, noise_multiplier=privacy["noise_multiplier"]
        )
    if args.compile != "off":  # the engine's compiled path: sink recording, exact; Poisson sizes: a dynamic batch dim
        model.compile(regional=True, **({} if args.compile == "default" else {"mode": args.compile}))
    if 1 / len(loader) != privacy["sample_rate"]:
        raise RuntimeError(f"engine sampling rate 1/{len(loader)} differs from the ledger's {privacy['sample_rate']}")
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        engine.accountant.load_state_dict(ckpt["accountant"])
    probe = probe_batch(dataset, args.probe_size, args.seed + 2)
    return PrivateRun(args, model, optimizer, criterion, loader, engine, privacy, device, noise_gen, trainable, probe)


def finish(run: PrivateRun, history: list, finished: bool) -> dict:
    """The summary: printed, written to --metrics-out, returned. ε is infinite (null in JSON) without noise."""
    args, privacy = run.args, run.privacy
    steps, sigma = ledger_steps(run.engine.accountant), privacy["noise_multiplier"]
    summary = {
        "epsilon": epsilon_spent(run.engine, args.delta, sigma),
        "delta": args.delta,
        "steps": steps,
        "noise_multiplier": float(run.optimizer.noise_multiplier),
        "sample_rate": privacy["sample_rate"],
        "accountant": args.accountant,
        "accountant_history": [list(h) for h in run.engine.accountant.history],
        "history": history,
        "finished": finished,
    }
    if sigma == 0:
        summary["epsilon_infinite"] = True
        summary["epsilon_note"] = NON_PRIVATE_NOTE
    if args.metrics_out:
        atomic_write_json(args.metrics_out, summary, indent=1)
    state = "final" if finished else f"stopped after {steps} of {args.epochs * run.steps_per_epoch} steps;"
    print(
        f"{state} privacy: (ε, δ) = ({summary['epsilon']:.4f}, {args.delta:g}) — σ={summary['noise_multiplier']:.4f}, "
        f"q={privacy['sample_rate']:.4g}, steps={steps}, accountant={args.accountant}"
        + (" — NOT PRIVATE: no noise was added (--non-private)" if sigma == 0 else "")
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 unexpected failure, 2 bad input (one line, nothing written), 130 interrupted."""
    argv = sys.argv[1:] if argv is None else argv
    bad_input = (PrivacyConfigError, NotImplementedError, FileNotFoundError)  # the engine's and loaders' own errors
    return run_tool(TOOL, lambda: _train_from_argv(argv), bad_input=bad_input)


def _train_from_argv(argv: list[str]) -> int:
    train(parse_args(argv), argv)
    return 0
