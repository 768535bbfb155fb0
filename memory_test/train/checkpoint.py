"""Checkpoints: written atomically, read without code execution, and resumed only under the same privacy mechanism
(a resumed ledger must describe the run it continues)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from memory_test.cli_common.errors import ToolError
from memory_test.cli_common.files import atomic_path
from memory_test.diffusion.latent_dataset import LatentDataset
from memory_test.privacy import resolve_mode

CHECKPOINT_FORMAT = "memory_test.train_dp.v1"
# Settings a resumed run must share with the checkpoint, or its ledger would describe a different mechanism.
PRIVACY_KEYS = (
    "mode",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "delta",
    "accountant",
    "noise_multiplicity",
    "dataset_size",
    "dataset_fingerprint",
    "target_epsilon",
    "epochs",
)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save to a temp file beside ``path``, then os.replace: a kill leaves the old checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint`, unpickled with weights_only=True (no code execution)."""
    fix = "restore it from a copy, or start a new run with another --checkpoint (its privacy ledger starts over)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file is a zip error, a foreign one an unpickling error: name the file
        first = str(e).splitlines()[0] if str(e) else ""
        raise ToolError(f"--checkpoint {path} cannot be read ({type(e).__name__}: {first})", fix) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ToolError(f"--checkpoint {path} is not a train_dp checkpoint (format {found!r})", fix)
    return state


def checkpoint_to_resume(args: argparse.Namespace) -> dict | None:
    if not args.resume:
        return None
    if Path(args.checkpoint).exists():
        return load_checkpoint(args.checkpoint)
    # said out loud: a typo in the path would otherwise restart the privacy ledger unnoticed
    print(f"--resume: no checkpoint at {args.checkpoint}, starting a new run and ledger")
    return None


def privacy_settings(args: argparse.Namespace, dataset: LatentDataset) -> dict:
    """The mechanism this run accounts for; a resumed run must match its checkpoint's on every PRIVACY_KEYS key."""
    return {
        "mode": resolve_mode(args.mode).name if args.mode != "hooks" else "hooks",
        "noise_multiplier": args.noise_multiplier,
        "max_grad_norm": args.max_grad_norm,
        "sample_rate": 1 / math.ceil(len(dataset) / args.batch_size),
        "delta": args.delta,
        "accountant": args.accountant,
        "noise_multiplicity": args.noise_multiplicity,
        "dataset_size": len(dataset),
        "dataset_fingerprint": dataset.fingerprint,
        "target_epsilon": args.target_epsilon,
        "epochs": args.epochs,
    }


def check_resume(ckpt: dict, privacy: dict, args: argparse.Namespace) -> None:
    """Refuse a resume whose ledger would describe another mechanism, or whose weights belong to another model."""
    if args.target_epsilon is not None:  # σ was derived from the target: take it from the ledger's owner
        privacy["noise_multiplier"] = ckpt["privacy"]["noise_multiplier"]
    changed = [k for k in PRIVACY_KEYS if ckpt["privacy"][k] != privacy[k]]
    if changed:
        diff = ", ".join(f"{k}: {ckpt['privacy'][k]} -> {privacy[k]}" for k in changed)
        raise ToolError(
            f"cannot resume {args.checkpoint} with changed privacy settings ({diff})",
            "rerun with the checkpoint's settings, or start a new run with another --checkpoint",
        )
    trained = ckpt.get("run", {}).get("model")
    if trained is not None and trained != args.model:
        raise ToolError(
            f"cannot resume {args.checkpoint}: it holds a {trained} model, not --model {args.model}",
            f"pass --model {trained}, or start a new run with another --checkpoint",
        )
    check_training_settings(ckpt.get("run", {}), args)


# Training settings a resume keeps (not privacy: the ledger does not depend on them). --lr would be silently
# replaced by the checkpoint's optimizer state, and a changed label dropout changes the objective mid-run: refused.
# --compile, --physical-batch-size and the attention kernel change how a step is computed, not what: allowed.
KEPT_ON_RESUME = {"lr": "--lr", "class_dropout": "--class-dropout"}
HOW_NOT_WHAT = {"compile": "--compile"}


def run_settings(args: argparse.Namespace) -> dict:
    """The checkpoint's ``run`` block: the model and the training settings a resume is checked against."""
    return {"model": args.model, **{k: getattr(args, k) for k in (*KEPT_ON_RESUME, *HOW_NOT_WHAT)}}


def check_training_settings(saved: dict, args: argparse.Namespace) -> None:
    """Refuse a resume whose --lr or --class-dropout differ from the checkpoint's; say so when --compile does (the
    same update either way). Checkpoints from before these were saved are not checked."""
    changed = [f"{flag} {saved[k]} -> {getattr(args, k)}" for k, flag in KEPT_ON_RESUME.items()
               if k in saved and saved[k] != getattr(args, k)]  # fmt: skip
    if changed:
        raise ToolError(
            f"cannot resume {args.checkpoint} with changed training settings ({', '.join(changed)}): a resume "
            "continues the same run (its optimizer state would keep the old learning rate)",
            "rerun with the checkpoint's values, or start a new run with another --checkpoint",
        )
    for k, flag in HOW_NOT_WHAT.items():
        if k in saved and saved[k] != getattr(args, k):
            print(f"note: resuming with {flag} {getattr(args, k)} (the checkpoint ran with {saved[k]}): the same "
                  "update, computed differently; the ledger continues")  # fmt: skip


def load_model_state(model: torch.nn.Module, ckpt: dict, args: argparse.Namespace) -> None:
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # a checkpoint from before the model was recorded in it
        raise ToolError(
            f"--checkpoint {args.checkpoint} does not fit --model {args.model} ({str(e).splitlines()[0]})",
            "resume with the --model it was trained with",
        ) from None


def rng_state(noise_gen: torch.Generator) -> dict:
    # Poisson sampling, class dropout and the optimizer's noise use torch's global generators; t and ε use noise_gen.
    state = {"cpu": torch.get_rng_state(), "objective": noise_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, noise_gen: torch.Generator) -> None:
    torch.set_rng_state(state["cpu"])
    noise_gen.set_state(state["objective"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
