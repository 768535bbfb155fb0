"""train_dp's flags, and every check made before any work: counts, privacy values, files, how it was launched."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from memory_test.cli_common.devices import resolve_device
from memory_test.cli_common.errors import ToolArgumentParser, ToolError
from memory_test.cli_common.files import check_output_path
from memory_test.privacy import MODES, resolve_mode, valid_mode_names
from memory_test.privacy.errors import PrivacyConfigError

TOOL = "train_dp"
ENTRY = "memory_test.train"
DESCRIPTION = "Train a DiT with DP-SGD on pre-computed VAE latents: Poisson sampling, an (ε, δ) ledger, resume."
HELP_EPILOG = (
    "An existing --checkpoint is never overwritten by a new run: without --resume it is refused (it holds the only "
    "record of the privacy already spent). Bad input ends with one line `train_dp: error: <what> — <what to do>` "
    "and exit code 2, before any work; MEMORY_TEST_DEBUG=1 shows tracebacks."
)


# single_experiment's --compile values; reduce-overhead (CUDA graphs) is refused for the DP modes until verified
# exact (suite/validate.check_compile), which is every mode train_dp runs.
COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead")


def parse_args(argv=None) -> argparse.Namespace:
    p = ToolArgumentParser(prog=TOOL, description=DESCRIPTION, epilog=HELP_EPILOG)
    p.add_argument("--latents", required=True, help="latent file from `python -m memory_test.diffusion.latent_dataset`")
    p.add_argument("--model", default="DiT-XL/2", help="DiT preset or Hub name (memory_test.models.dit_presets)")
    p.add_argument("--pretrained", action="store_true", help="start from the Hub checkpoint (must be in the HF cache)")
    p.add_argument("--pretrained-path", default=None, help="local diffusers DiT directory for --pretrained")
    p.add_argument("--mode", default="flash_bk", choices=valid_mode_names(), help="DP clipping mode (registry)")
    p.add_argument("--no-flash-attention", action="store_true", help="plain attention instead of fused SDPA")
    p.add_argument(
        "--compile", default="off", choices=COMPILE_MODES,
        help="torch.compile the DiT blocks through the engine (dp_model.compile, exact): off, default, max-autotune "
        "(reduce-overhead is refused: CUDA graphs are not yet verified exact for DP); a resume may change it",
    )  # fmt: skip
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
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint: same privacy settings, --model, --lr, --class-dropout; --compile may change",
    )
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
    if args.compile == "reduce-overhead":
        raise ToolError("--compile reduce-overhead: CUDA graphs are not yet verified exact for the DP modes (the "
                        "recorded layer inputs and output gradients would live in the graphs' memory pool)",
                        "use --compile default or max-autotune")  # fmt: skip
    if args.pretrained_path and not args.pretrained:
        raise ToolError("--pretrained-path without --pretrained would be ignored", "add --pretrained to start from it")
    if args.compile != "off" and args.mode == "hooks":
        raise ToolError("--compile with --mode hooks: upstream Opacus hooks do not run under torch.compile",
                        "use one of this package's modes (e.g. --mode flash_bk) or --compile off")  # fmt: skip
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
    for flag, path in (("--checkpoint", args.checkpoint), ("--metrics-out", args.metrics_out)):
        if path is not None and not path.strip():  # an unset shell variable: the run would save nothing
            raise ToolError(f"{flag} is empty", f"give a file path, or leave {flag} out")
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


def check_launch(mode_name: str, argv: list[str] | None = None, entry: str = ENTRY):
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
    """train_dp trains on one device; a sharded mode would need an FSDP launch and sharded checkpoints."""
    if mode_name != "hooks" and resolve_mode(mode_name).distributed:
        single = [m.name for m in MODES.values() if not m.distributed]
        raise NotImplementedError(
            f"mode {mode_name!r} shards the model over several GPUs (launched with `torchrun --nproc-per-node=N`); "
            f"train_dp trains single-device modes only ({', '.join(single)}, hooks): pick one of those"
        )


def resolve_train_device(name: str):
    try:
        return resolve_device(name)
    except ToolError as e:
        raise ToolError(e.what, e.fix or "use cpu, cuda or cuda:N") from None
