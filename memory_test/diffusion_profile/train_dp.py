"""Train a DiT with DP-SGD on pre-computed VAE latents: any registry mode, Poisson sampling, an (ε, δ) ledger, resume.

Example (see docs/TRAIN_DP.md):
    python -m memory_test.diffusion.latent_dataset --images data/train --out latents.safetensors --image-size 256
    python -m memory_test.diffusion_profile.train_dp --latents latents.safetensors --model DiT-XL/2 \
        --mode flash_bk --batch-size 1024 --physical-batch-size 32 --epochs 10 --target-epsilon 8 --delta 1e-6 \
        --noise-multiplicity 4 --checkpoint ckpt.pt --resume
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader
from tqdm import tqdm

from memory_test.cli_common.errors import ToolArgumentParser, ToolError, run_tool
from memory_test.cli_common.files import atomic_path, atomic_write_json, check_output_path
from memory_test.diffusion.latent_dataset import LatentDataset
from memory_test.diffusion.objective import EpsilonMSECriterion, make_noisy_batch
from memory_test.models.dit_presets import build_dit_config
from memory_test.diffusion_profile.run_config import UsageError, resolve_device
from memory_test.privacy import MODES, PrivacyEngine, resolve_mode, valid_mode_names
from memory_test.privacy.errors import PrivacyConfigError

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
NON_PRIVATE_NOTE = "noise_multiplier 0 (--non-private): no noise was added, so there is no privacy; ε is infinite"


TOOL = "train_dp"
HELP_EPILOG = (
    "An existing --checkpoint is never overwritten by a new run: without --resume it is refused (it holds the only "
    "record of the privacy already spent). Bad input ends with one line `train_dp: error: <what> — <what to do>` "
    "and exit code 2, before any work; MEMORY_TEST_DEBUG=1 shows tracebacks."
)


def parse_args(argv=None) -> argparse.Namespace:
    p = ToolArgumentParser(prog=TOOL, description=__doc__.splitlines()[0], epilog=HELP_EPILOG)
    p.add_argument("--latents", required=True, help="latent file from `python -m memory_test.diffusion.latent_dataset`")
    p.add_argument(
        "--model", default="DiT-XL/2", help="DiT preset or Hub name (memory_test.models.dit_presets)"
    )
    p.add_argument("--pretrained", action="store_true", help="start from the Hub checkpoint (must be in the HF cache)")
    p.add_argument("--pretrained-path", default=None, help="local diffusers DiT directory for --pretrained")
    p.add_argument("--mode", default="flash_bk", choices=valid_mode_names(), help="DP clipping mode (registry)")
    p.add_argument("--no-flash-attention", action="store_true", help="plain attention instead of fused SDPA")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop (and checkpoint) after this many logical steps")
    p.add_argument("--batch-size", type=int, default=256, help="expected logical batch; sampling rate q = 1/ceil(N/B)")
    p.add_argument("--physical-batch-size", type=int, default=32, help="samples per forward/backward (K rows each)")
    p.add_argument("--noise-multiplicity", type=int, default=1, help="K (t, ε) draws per sample, averaged (DPDM)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clipping norm C (finite, > 0)")
    noise = p.add_mutually_exclusive_group(required=True)
    noise.add_argument("--noise-multiplier", type=float, help="σ (finite, > 0; 0 only with --non-private): std σ·C")
    noise.add_argument("--target-epsilon", type=float, help="pick σ so that ε reaches this (> 0) after --epochs")
    p.add_argument(
        "--non-private",
        action="store_true",
        help="allow --noise-multiplier 0: no noise is added, so the run is NOT private (ε is reported as infinite)",
    )
    p.add_argument("--delta", type=float, default=1e-5, help="δ of the reported (ε, δ); must be below 1/N")
    p.add_argument("--accountant", default="prv", choices=("prv", "rdp", "gdp"))
    p.add_argument("--class-dropout", type=float, default=0.1, help="label dropout for classifier-free guidance")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint file, written atomically; an existing one is refused unless --resume is given",
    )
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N logical steps (0: epochs)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint (same privacy settings)")
    p.add_argument("--probe-size", type=int, default=256, help="samples in the fixed loss probe (0: none)")
    p.add_argument("--metrics-out", default=None, help="write per-epoch ε and losses as JSON here (atomically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace, argv: list[str] | None = None) -> None:
    """Every flag on its own (no file is read, nothing is written): ToolError for the first bad one."""
    refuse_sharded(args.mode)
    check_launch(args.mode, argv)
    counts = {
        "--epochs": (args.epochs, 1),
        "--batch-size": (args.batch_size, 1),
        "--physical-batch-size": (args.physical_batch_size, 1),
        "--noise-multiplicity": (args.noise_multiplicity, 1),
        "--max-steps": (args.max_steps, 1),
        "--checkpoint-every": (args.checkpoint_every, 0),
        "--probe-size": (args.probe_size, 0),
    }
    for flag, (value, least) in counts.items():
        if value is not None and value < least:
            raise ToolError(f"{flag} must be an integer >= {least}, got {value}", f"see `{TOOL} --help`")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ToolError(f"--lr must be a finite number > 0, got {args.lr}", "e.g. --lr 1e-4")
    if not 0 <= args.class_dropout < 1:
        raise ToolError(f"--class-dropout must be in [0, 1), got {args.class_dropout}", "e.g. 0.1 (DiT's)")
    check_privacy_args(args)
    check_files(args)


def check_privacy_args(args: argparse.Namespace) -> None:
    """σ, C, ε and δ where they enter: ε is only ever reported for noise that is actually added."""
    if not (math.isfinite(args.max_grad_norm) and args.max_grad_norm > 0):
        raise ToolError(f"--max-grad-norm (C) must be a finite number > 0, got {args.max_grad_norm}", "e.g. 1.0")
    sigma = args.noise_multiplier
    if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
        raise ToolError(f"--noise-multiplier (σ) must be a finite number >= 0, got {sigma}", "e.g. 1.0")
    if sigma == 0 and not args.non_private:
        raise ToolError(
            "--noise-multiplier 0 adds no noise: the run would not be private",
            "give σ > 0 (or --target-epsilon), or add --non-private to train without privacy (ε = ∞)",
        )
    if args.non_private and sigma != 0:
        raise ToolError("--non-private goes with --noise-multiplier 0 only", "drop --non-private for a private run")
    eps = args.target_epsilon
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise ToolError(f"--target-epsilon must be a finite number > 0, got {eps}", "e.g. --target-epsilon 8")
    if not (math.isfinite(args.delta) and 0 < args.delta < 1):
        raise ToolError(f"--delta must be in (0, 1) and below 1/N, got {args.delta}", "e.g. --delta 1e-6")


def check_files(args: argparse.Namespace) -> None:
    """The input exists, the outputs can be written, and an existing checkpoint is resumed, never replaced."""
    latents = Path(args.latents)
    if not latents.is_file():
        what = "is a folder" if latents.is_dir() else "does not exist"
        raise ToolError(
            f"--latents {latents} {what}",
            "give the .safetensors file written by `python -m memory_test.diffusion.latent_dataset`",
        )
    if args.resume and not args.checkpoint:
        raise ToolError("--resume needs --checkpoint", "name the checkpoint file to continue from")
    if args.checkpoint:
        check_output_path(args.checkpoint, "--checkpoint")
        if Path(args.checkpoint).exists() and not args.resume:
            raise ToolError(
                f"--checkpoint {args.checkpoint} already exists (a run and its privacy ledger): a new run would "
                "replace it",
                "add --resume to continue it, or choose another --checkpoint path",
            )
    if args.metrics_out:
        check_output_path(args.metrics_out, "--metrics-out")


def resolve_train_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except UsageError as e:
        raise ToolError(str(e), None if " — " in str(e) else "use cpu, cuda or cuda:N") from None


def open_latents(path: str) -> LatentDataset:
    """The latent dataset, or a ToolError naming the file and how to get a good one."""
    try:
        return LatentDataset(path)
    except (OSError, ValueError) as e:
        raise ToolError(
            f"--latents {e}", "re-create it with `python -m memory_test.diffusion.latent_dataset`"
        ) from None


def check_launch(mode_name: str, argv: list[str] | None = None, entry: str = "memory_test.diffusion_profile.train_dp"):
    """Sharded modes need torchrun with several processes; single-process modes must not run once per rank."""
    distributed = mode_name != "hooks" and resolve_mode(mode_name).distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if distributed and world < 2:
        cmd = " ".join([f"torchrun --nproc-per-node=<num GPUs> -m {entry}", *(argv or [])])
        raise PrivacyConfigError(f"mode {mode_name!r} shards the model over several GPUs: launch it as `{cmd}`")
    if not distributed and world > 1:
        raise PrivacyConfigError(
            f"mode {mode_name!r} is single-process but WORLD_SIZE={world}: every rank would sample and account on "
            f"its own. Run it with `python -m {entry} ...`, not torchrun"
        )


def refuse_sharded(mode_name: str) -> None:
    """train_dp.py trains on one device; a sharded mode would need an FSDP launch and sharded checkpoints."""
    if mode_name != "hooks" and resolve_mode(mode_name).distributed:
        single = [m.name for m in MODES.values() if not m.distributed]
        raise NotImplementedError(
            f"mode {mode_name!r} shards the model over several GPUs (launched with `torchrun --nproc-per-node=N`); "
            f"train_dp.py trains single-device modes only ({', '.join(single)}, hooks): pick one of those"
        )


def build_model(args: argparse.Namespace, dataset: LatentDataset) -> torch.nn.Module:
    """The DiT wrapper sized for the dataset: its image size and class count."""
    from memory_test.models.dit_huggingface_wrapper import DiTHuggingFaceWrapper

    return DiTHuggingFaceWrapper(
        model_name=args.model,
        img_size=dataset.image_size,
        in_channels=dataset.latent_shape[0],
        num_classes=dataset.num_classes,
        pretrained=args.pretrained,
        pretrained_path=args.pretrained_path,
        use_flash_attention=not args.no_flash_attention,
        class_dropout_prob=args.class_dropout,
    )


def check_dataset(dataset: LatentDataset, delta: float) -> None:
    """Catch RGB data and a δ too large to mean anything before any model is built."""
    channels = dataset.latent_shape[0]
    if channels != 4:
        raise ToolError(
            f"{dataset.path} holds {channels}-channel tensors, DiT needs 4-channel SD VAE latents",
            "these look like RGB images: encode them first with `python -m memory_test.diffusion.latent_dataset`"
            if channels == 3
            else "encode the images with `python -m memory_test.diffusion.latent_dataset`",
        )
    if not 0 < delta < 1 / len(dataset):
        raise ToolError(
            f"--delta {delta} must be in (0, 1/N) = (0, {1 / len(dataset):.3g}) for N={len(dataset)}",
            f"pass a smaller δ, e.g. --delta {10 ** math.floor(math.log10(0.1 / len(dataset))):g}",
        )


def check_model_fits(model: str, dataset: LatentDataset) -> None:
    """The DiT can be built for this latent file (its image size, channels and classes)."""
    try:
        build_dit_config(model, dataset.image_size, None, dataset.latent_shape[0], dataset.num_classes)
    except ValueError as e:
        raise ToolError(f"--model {model} does not fit {dataset.path}: {e}", "pick another --model") from None


def ledger_steps(accountant) -> int:
    """Noisy steps recorded by an Opacus accountant (history entries are (σ, q, steps))."""
    return sum(entry[-1] for entry in accountant.history)


def epsilon_spent(engine, delta: float, sigma: float) -> float:
    """ε of the ledger so far; infinite when no noise is added (σ = 0), where no accountant may put a number on it."""
    if sigma == 0:
        return math.inf
    return float(engine.get_epsilon(delta)) if ledger_steps(engine.accountant) else 0.0


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


def load_model_state(model: torch.nn.Module, ckpt: dict, args: argparse.Namespace) -> None:
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # a checkpoint from before the model was recorded in it
        raise ToolError(
            f"--checkpoint {args.checkpoint} does not fit --model {args.model} ({str(e).splitlines()[0]})",
            "resume with the --model it was trained with",
        ) from None


def _rng_state(noise_gen: torch.Generator) -> dict:
    # Poisson sampling, class dropout and the optimizer's noise use torch's global generators; t and ε use noise_gen.
    state = {"cpu": torch.get_rng_state(), "objective": noise_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, noise_gen: torch.Generator) -> None:
    torch.set_rng_state(state["cpu"])
    noise_gen.set_state(state["objective"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


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


def train(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Run (or resume) private training; returns the summary also written to --metrics-out.

    Every input is checked before any work; a bad one raises ToolError (main turns it into one line, exit 2).
    """
    check_args(args, argv)
    device = resolve_train_device(args.device)
    dataset = open_latents(args.latents)
    check_dataset(dataset, args.delta)
    check_model_fits(args.model, dataset)
    ckpt = checkpoint_to_resume(args)
    privacy = privacy_settings(args, dataset)
    if ckpt is not None:
        check_resume(ckpt, privacy, args)

    torch.manual_seed(args.seed)
    model = build_model(args, dataset).to(device).train()
    if ckpt is not None:
        load_model_state(model, ckpt, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    loader = DataLoader(dataset, batch_size=args.batch_size)
    criterion = EpsilonMSECriterion(args.noise_multiplicity)
    engine = PrivacyEngine(accountant=args.accountant)
    common = dict(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=criterion,
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
    if 1 / len(loader) != privacy["sample_rate"]:
        raise RuntimeError(f"engine sampling rate 1/{len(loader)} differs from the ledger's {privacy['sample_rate']}")
    sigma = privacy["noise_multiplier"]
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    steps_per_epoch = len(loader)
    epoch, step_in_epoch, history = 0, 0, []
    # The epoch's loss so far: restored from a mid-epoch checkpoint, so the epoch's train_loss counts every batch.
    loss_sum, loss_n = 0.0, 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        engine.accountant.load_state_dict(ckpt["accountant"])
        epoch, step_in_epoch = ckpt["progress"]["epoch"], ckpt["progress"]["step_in_epoch"]
        if step_in_epoch > 0:  # older checkpoints lack it: the epoch's loss then counts batches after the resume
            loss_sum, loss_n = ckpt.get("epoch_loss", {}).get("sum", 0.0), ckpt.get("epoch_loss", {}).get("n", 0)
        history = [dict(h) for h in ckpt["history"]]

    gen_probe = torch.Generator().manual_seed(args.seed + 2)
    probe_idx = torch.randperm(len(dataset), generator=gen_probe)[: args.probe_size]
    probe = (dataset.latents[probe_idx].float(), dataset.labels[probe_idx])
    K = args.noise_multiplicity

    def checkpoint(ep, s_in_ep):
        if args.checkpoint:
            progress = {"epoch": ep, "step_in_epoch": s_in_ep, "global_step": ledger_steps(engine.accountant)}
            save_checkpoint(
                args.checkpoint,
                {
                    "format": CHECKPOINT_FORMAT,
                    "model": model._module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "accountant": engine.accountant.state_dict(),
                    "privacy": privacy,
                    "run": {"model": args.model},
                    "progress": progress,
                    "epoch_loss": {"sum": loss_sum, "n": loss_n},
                    "rng": _rng_state(noise_gen),
                    "history": history,
                },
            )

    if ckpt is None and args.probe_size:
        history.append(
            {"epoch": 0, "step": 0, "epsilon": 0.0, "probe_loss": probe_loss(model, *probe, K, device, args.seed + 3)}
        )
    total = args.epochs * steps_per_epoch
    bar = tqdm(total=total, initial=ledger_steps(engine.accountant), unit="step", disable=args.no_progress)
    stopped = args.max_steps is not None and ledger_steps(engine.accountant) >= args.max_steps
    while epoch < args.epochs and not stopped:
        with BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=args.physical_batch_size, optimizer=optimizer
        ) as physical_loader:
            # Creating a DataLoader iterator draws its base seed from the global generator. A checkpoint taken at an
            # epoch boundary precedes that draw, one taken mid-epoch follows it: restore on the same side of it.
            if ckpt is not None and step_in_epoch == 0:
                _set_rng_state(ckpt["rng"], noise_gen)
            batches = iter(physical_loader)
            if ckpt is not None and step_in_epoch > 0:
                _set_rng_state(ckpt["rng"], noise_gen)
            ckpt = None
            while step_in_epoch < steps_per_epoch:
                before = ledger_steps(engine.accountant)
                x0, y = next(batches)
                if len(x0) == 0:  # an empty Poisson batch still takes a (noise-only) step
                    for p in trainable:
                        p.grad = torch.zeros_like(p)
                else:
                    x_t, t, y_rep, eps = make_noisy_batch(x0.to(device), y.to(device), K, generator=noise_gen)
                    loss = criterion(model(x_t, t, y_rep), eps)
                    loss.backward()
                    loss_sum, loss_n = loss_sum + loss.loss_per_sample.detach().sum().item(), loss_n + len(x0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ledger_steps(engine.accountant) == before:
                    continue  # a physical batch inside a logical one: no step taken yet
                step_in_epoch += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / max(loss_n, 1):.4f}")
                done = ledger_steps(engine.accountant)
                if args.max_steps is not None and done >= args.max_steps:
                    stopped = True
                    break
                if args.checkpoint_every and done % args.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                    checkpoint(epoch, step_in_epoch)
        if step_in_epoch == steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
            record = {
                "epoch": epoch,
                "step": ledger_steps(engine.accountant),
                "epsilon": epsilon_spent(engine, args.delta, sigma),
                "train_loss": loss_sum / max(loss_n, 1),
            }
            loss_sum, loss_n = 0.0, 0
            if args.probe_size:
                record["probe_loss"] = probe_loss(model, *probe, K, device, args.seed + 3)
            history.append(record)
            bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        checkpoint(epoch, step_in_epoch)
    bar.close()
    return finish(args, engine, optimizer, privacy, history, finished=epoch >= args.epochs, total=total)


def finish(args, engine, optimizer, privacy: dict, history: list, finished: bool, total: int) -> dict:
    """The summary: printed, written to --metrics-out, returned. ε is infinite (null in JSON) without noise."""
    steps = ledger_steps(engine.accountant)
    sigma = privacy["noise_multiplier"]
    summary = {
        "epsilon": epsilon_spent(engine, args.delta, sigma),
        "delta": args.delta,
        "steps": steps,
        "noise_multiplier": float(optimizer.noise_multiplier),
        "sample_rate": privacy["sample_rate"],
        "accountant": args.accountant,
        "accountant_history": [list(h) for h in engine.accountant.history],
        "history": history,
        "finished": finished,
    }
    if sigma == 0:
        summary["epsilon_infinite"] = True
        summary["epsilon_note"] = NON_PRIVATE_NOTE
    if args.metrics_out:
        atomic_write_json(args.metrics_out, summary, indent=1)
    state = "final" if finished else f"stopped after {steps} of {total} steps;"
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


if __name__ == "__main__":
    sys.exit(main())
