"""Train a DiT with DP-SGD on pre-computed VAE latents: any registry mode, Poisson sampling, an (ε, δ) ledger, resume.

Example (see docs/TRAIN_DP.md):
    python -m memory_test.diffusion.latent_dataset --images data/train --out latents.safetensors --image-size 256
    python -m memory_test.diffusion_profile.train_dp --latents latents.safetensors --model DiT-XL/2 \
        --mode flash_bk --batch-size 1024 --physical-batch-size 32 --epochs 10 --target-epsilon 8 --delta 1e-6 \
        --noise-multiplicity 4 --checkpoint ckpt.pt --resume
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader
from tqdm import tqdm

from memory_test.diffusion.latent_dataset import LatentDataset, read_metadata
from memory_test.diffusion.objective import EpsilonMSECriterion, make_noisy_batch
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", required=True, help="latent file from `python -m memory_test.diffusion.latent_dataset`")
    p.add_argument(
        "--model", default="DiT-XL/2", help="DiT preset or Hub name (memory_test.diffusion_profile.dit_models)"
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
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clipping norm C")
    noise = p.add_mutually_exclusive_group(required=True)
    noise.add_argument("--noise-multiplier", type=float, help="σ: noise std is σ·C")
    noise.add_argument("--target-epsilon", type=float, help="pick σ so that ε reaches this after --epochs")
    p.add_argument("--delta", type=float, default=1e-5, help="δ of the reported (ε, δ); must be below 1/N")
    p.add_argument("--accountant", default="prv", choices=("prv", "rdp", "gdp"))
    p.add_argument("--class-dropout", type=float, default=0.1, help="label dropout for classifier-free guidance")
    p.add_argument("--checkpoint", default=None, help="checkpoint file, written atomically")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N logical steps (0: epochs)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint (same privacy settings)")
    p.add_argument("--probe-size", type=int, default=256, help="samples in the fixed loss probe (0: none)")
    p.add_argument("--metrics-out", default=None, help="write per-epoch ε and losses as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


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
    from memory_test.diffusion_profile.dit_huggingface_wrapper import DiTHuggingFaceWrapper

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
        raise ValueError(
            f"{dataset.path} holds {channels}-channel tensors, DiT needs 4-channel SD VAE latents"
            + (
                ": these look like RGB images. Encode them first with `python -m memory_test.diffusion.latent_dataset`"
                if channels == 3
                else ""
            )
        )
    if not 0 < delta < 1 / len(dataset):
        raise ValueError(f"--delta {delta} must be in (0, 1/N) = (0, {1 / len(dataset):.3g}) for N={len(dataset)}")


def ledger_steps(accountant) -> int:
    """Noisy steps recorded by an Opacus accountant (history entries are (σ, q, steps))."""
    return sum(entry[-1] for entry in accountant.history)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save to a temp file beside ``path``, then os.replace: a kill leaves the old checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint`, unpickled with weights_only=True (no code execution)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a train_dp checkpoint (format {state.get('format')!r})")
    return state


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
    """Run (or resume) private training; returns the summary also written to --metrics-out."""
    refuse_sharded(args.mode)
    check_launch(args.mode, argv)
    if args.resume and not args.checkpoint:
        raise ValueError("--resume needs --checkpoint")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dataset = LatentDataset(args.latents)
    check_dataset(dataset, args.delta)
    ckpt = None
    if args.resume:
        if Path(args.checkpoint).exists():
            ckpt = load_checkpoint(args.checkpoint)
        else:  # said out loud: a typo in the path would otherwise restart the privacy ledger unnoticed
            print(f"--resume: no checkpoint at {args.checkpoint}, starting a new run and ledger")

    privacy = {
        "mode": resolve_mode(args.mode).name if args.mode != "hooks" else "hooks",
        "noise_multiplier": args.noise_multiplier,
        "max_grad_norm": args.max_grad_norm,
        "sample_rate": 1 / math.ceil(len(dataset) / args.batch_size),
        "delta": args.delta,
        "accountant": args.accountant,
        "noise_multiplicity": args.noise_multiplicity,
        "dataset_size": len(dataset),
        "dataset_fingerprint": read_metadata(args.latents)["fingerprint"],
        "target_epsilon": args.target_epsilon,
        "epochs": args.epochs,
    }
    if ckpt is not None:
        if args.target_epsilon is not None:  # σ was derived from the target: take it from the ledger's owner
            privacy["noise_multiplier"] = ckpt["privacy"]["noise_multiplier"]
        changed = [k for k in PRIVACY_KEYS if ckpt["privacy"][k] != privacy[k]]
        if changed:
            diff = ", ".join(f"{k}: {ckpt['privacy'][k]} -> {privacy[k]}" for k in changed)
            raise ValueError(f"cannot resume {args.checkpoint} with changed privacy settings ({diff})")

    model = build_model(args, dataset).to(device).train()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
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
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    steps_per_epoch = len(loader)
    epoch, step_in_epoch, history = 0, 0, []
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        engine.accountant.load_state_dict(ckpt["accountant"])
        epoch, step_in_epoch = ckpt["progress"]["epoch"], ckpt["progress"]["step_in_epoch"]
        history = [dict(h) for h in ckpt["history"]]

    gen_probe = torch.Generator().manual_seed(args.seed + 2)
    probe_idx = torch.randperm(len(dataset), generator=gen_probe)[: args.probe_size]
    probe = (dataset.latents[probe_idx].float(), dataset.labels[probe_idx])
    K = args.noise_multiplicity

    def checkpoint(ep, s_in_ep):
        if args.checkpoint:
            save_checkpoint(
                args.checkpoint,
                {
                    "format": CHECKPOINT_FORMAT,
                    "model": model._module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "accountant": engine.accountant.state_dict(),
                    "privacy": privacy,
                    "progress": {"epoch": ep, "step_in_epoch": s_in_ep, "global_step": ledger_steps(engine.accountant)},
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
        loss_sum, loss_n = 0.0, 0
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
            eps_now = float(engine.get_epsilon(args.delta))
            record = {
                "epoch": epoch,
                "step": ledger_steps(engine.accountant),
                "epsilon": eps_now,
                "train_loss": loss_sum / max(loss_n, 1),
            }
            if args.probe_size:
                record["probe_loss"] = probe_loss(model, *probe, K, device, args.seed + 3)
            history.append(record)
            bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        checkpoint(epoch, step_in_epoch)
    bar.close()

    steps = ledger_steps(engine.accountant)
    summary = {
        "epsilon": float(engine.get_epsilon(args.delta)) if steps else 0.0,
        "delta": args.delta,
        "steps": steps,
        "noise_multiplier": float(optimizer.noise_multiplier),
        "sample_rate": privacy["sample_rate"],
        "accountant": args.accountant,
        "accountant_history": [list(h) for h in engine.accountant.history],
        "history": history,
        "finished": epoch >= args.epochs,
    }
    if args.metrics_out:
        Path(args.metrics_out).write_text(json.dumps(summary, indent=1))
    state = "final" if summary["finished"] else f"stopped after {steps} of {total} steps;"
    print(
        f"{state} privacy: (ε, δ) = ({summary['epsilon']:.4f}, {args.delta:g}) — σ={summary['noise_multiplier']:.4f}, "
        f"q={privacy['sample_rate']:.4g}, steps={steps}, accountant={args.accountant}"
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        train(args, argv)
    except (PrivacyConfigError, FileNotFoundError, NotImplementedError) as err:
        sys.exit(f"train_dp: error: {err}")


if __name__ == "__main__":
    main()
