"""single_experiment.py's command line: flags, validation into the run's config, and the privacy block."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from memory_test.cli_common.errors import ToolArgumentParser
from memory_test.diffusion_profile import distributed_launch as dl
from memory_test.models.dit_presets import DIT_MODELS, build_dit_config, resolve_model_name
from memory_test.profiling import records

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGENET_TRAIN_SIZE = 1_281_167
PRECISIONS = ("fp32", "bf16")
OPTIMIZER_NAMES = ("adamw", "adam", "sgd")
ACCOUNTANTS = ("prv", "rdp")
# Test hook: a run whose batch is larger than this raises torch.cuda.OutOfMemoryError at its first step, so that the
# oom path, the sweep's skipping and the max-batch search can be exercised without a GPU. Recorded in env.
INJECT_OOM_ENV = "MEMORY_TEST_INJECT_OOM_ABOVE_BATCH"


class UsageError(ValueError):
    """Bad input: reported on stderr, exit code 2, no record written. A message may end in " — <what to do>"."""


# ----- command line -------------------------------------------------------------------------------------------


def build_parser(experiment_names: list[str], exit_on_error: bool = True) -> argparse.ArgumentParser:
    """The flags; ``exit_on_error=False`` raises (ToolError, argparse.ArgumentError) instead of exiting (the sweep
    checks its pass-through values with this parser before it starts)."""
    p = ToolArgumentParser(
        prog="single_experiment.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        exit_on_error=exit_on_error,
    )
    g = p.add_argument_group("experiment")
    g.add_argument("--experiment", required=True, choices=experiment_names, help="training mode")
    g.add_argument("--output", required=True, help="JSON record to write (atomically)")
    g.add_argument("--batch-size", type=int, default=4, help="samples per step (B); per GPU with --nproc-per-node")
    g.add_argument("--num-iter", type=int, default=10, help="measured steps")
    g.add_argument("--warmup-iter", type=int, default=3, help="steps before the peak counters are reset")
    g.add_argument("--noise-multiplicity", type=int, default=1, help="K noise draws per image: B*K rows per step")
    g.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default=None,
        help=f"DiT size preset {sorted(DIT_MODELS)} or e.g. DiT-B/4, facebook/DiT-XL-2-256 "
        "(default: DiT-XL/2 on a GPU, DiT-tiny on CPU)",
    )
    m.add_argument("--image-size", type=int, default=None, help="image side in pixels (latents are 1/8); model default")
    m.add_argument("--patch-size", type=int, default=None, help="patch size (default: the model's)")
    m.add_argument("--in-channels", type=int, default=4, help="latent channels (SD VAE: 4)")
    m.add_argument("--num-classes", type=int, default=None, help="class labels (default: the model's)")
    fa = m.add_mutually_exclusive_group()
    fa.add_argument("--use-flash-attention", dest="use_flash_attention", action="store_true", default=True)
    fa.add_argument("--no-flash-attention", dest="use_flash_attention", action="store_false")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 = TF32 matmuls; bf16 = autocast")
    r.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="adamw")
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--memory-snapshot", default=None, metavar="PATH", help="CUDA allocator snapshot (.pickle)")
    r.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="processes (GPUs) under torchrun, started by this script: FSDP2 for the sharded DP modes "
        f"({', '.join(dl.sharded_experiments())}) and for vanilla; global batch = N x --batch-size",
    )
    d = p.add_argument_group("privacy")
    d.add_argument("--noise-multiplier", type=float, default=1.0, help="σ")
    d.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clipping norm C")
    d.add_argument("--dataset-size", type=int, default=IMAGENET_TRAIN_SIZE, help="N for q = B/N (ImageNet-1k)")
    d.add_argument("--delta", type=float, default=None, help="δ of the reported ε (default 1/N)")
    d.add_argument("--epochs", type=float, default=1.0, help="epochs the reported ε covers: steps = ceil(E*N/B)")
    d.add_argument("--accountant", choices=ACCOUNTANTS, default="prv")
    s = p.add_argument_group("max batch search")
    s.add_argument("--find-max-batch", action="store_true", help="largest batch that fits (doubling, then bisection)")
    s.add_argument("--max-batch-start", type=int, default=None, help="first probe (default: --batch-size)")
    s.add_argument("--max-batch-limit", type=int, default=None, help="stop there (default 65536 GPU, 64 CPU)")
    s.add_argument("--max-batch-resolution", type=int, default=1, help="stop bisecting at this gap")
    s.add_argument(
        "--max-batch-bracket",
        default=None,
        metavar="OK,OOM",
        help="batches already measured under this configuration (one ran, one ran out of memory): skip the doubling "
        "and bisect between them; recorded in the result",
    )
    s.add_argument("--probe-num-iter", type=int, default=2)
    s.add_argument("--probe-warmup-iter", type=int, default=1)
    s.add_argument("--probe-timeout", type=float, default=900.0, help="seconds per probe")
    # Used by run_all_experiments.sh: write a "skipped" or "error" record for this config without running it.
    p.add_argument("--record-only", choices=("skipped", "error"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--record-message", default=None, help=argparse.SUPPRESS)
    return p


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name} requested but no CUDA GPU is available (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda}) — use --device cpu (or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        raise UsageError(f"--device {name!r}: only cpu and cuda are supported")
    return dev


def model_for_run(requested: str | None, patch_size: int | None, device) -> tuple[str, str | None]:
    """Effective model name (seed flag --patch-size picks the family's /p variant); plus a notice if defaulted."""
    notice = None
    name = requested
    if name is None:
        name = "DiT-XL/2" if device.type == "cuda" else "DiT-tiny"
        if device.type != "cuda":
            notice = "no GPU: profiling DiT-tiny on CPU (pass --model DiT-XL/2 to override)"
    try:
        spec = resolve_model_name(name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if patch_size is not None and patch_size != spec.preset.patch_size:
        family = spec.preset.name.removeprefix("DiT-").split("/")[0]
        if family not in ("S", "B", "L", "XL") or name.startswith("facebook/"):
            raise UsageError(f"--patch-size {patch_size}: {name} only exists with patch size {spec.preset.patch_size}")
        name = f"DiT-{family}/{patch_size}"
    return name, notice


def validate(args: argparse.Namespace) -> tuple[dict, object, list[str]]:
    """The effective config of the run, the torch device, and notices; UsageError for any bad input."""
    from memory_test.diffusion_profile.experiments import resolve_experiment

    positive = {
        "--batch-size": args.batch_size,
        "--num-iter": args.num_iter,
        "--noise-multiplicity": args.noise_multiplicity,
        "--dataset-size": args.dataset_size,
        "--nproc-per-node": args.nproc_per_node,
        "--max-batch-resolution": args.max_batch_resolution,
        "--probe-num-iter": args.probe_num_iter,
    }
    for flag, v in positive.items():
        if v is None or v <= 0:
            raise UsageError(f"{flag} must be a positive integer, got {v}")
    if args.warmup_iter < 0 or args.probe_warmup_iter < 0:
        raise UsageError("--warmup-iter and --probe-warmup-iter must be >= 0")
    if args.max_batch_start is not None and args.max_batch_start <= 0:
        raise UsageError(f"--max-batch-start must be a positive integer, got {args.max_batch_start}")
    if args.max_batch_limit is not None and args.max_batch_limit <= 0:
        raise UsageError(f"--max-batch-limit must be a positive integer, got {args.max_batch_limit}")
    args.max_batch_bracket = parse_bracket(args.max_batch_bracket)
    if not (args.noise_multiplier >= 0 and math.isfinite(args.noise_multiplier)):
        raise UsageError(f"--noise-multiplier must be a finite number >= 0, got {args.noise_multiplier}")
    if not (args.max_grad_norm > 0 and math.isfinite(args.max_grad_norm)):
        raise UsageError(f"--max-grad-norm must be a finite number > 0, got {args.max_grad_norm}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    if not (args.epochs > 0 and math.isfinite(args.epochs)):
        raise UsageError(f"--epochs must be a finite number > 0, got {args.epochs}")
    delta = args.delta if args.delta is not None else 1.0 / args.dataset_size
    if not 0 < delta < 1:
        raise UsageError(f"--delta must be in (0, 1), got {delta}")
    if args.batch_size > args.dataset_size and not args.find_max_batch:
        raise UsageError(f"--batch-size {args.batch_size} exceeds --dataset-size {args.dataset_size}")

    exp = resolve_experiment(args.experiment)
    if args.noise_multiplicity > 1 and not exp.supports_noise_multiplicity:
        raise UsageError(
            f"--experiment {exp.name} is unmodified upstream Opacus, which treats every row as a sample and cannot "
            f"group the K={args.noise_multiplicity} noise draws of one image into one privacy unit; use "
            "--noise-multiplicity 1, or an engine mode (e.g. ghost, bookkeeping) which supports K > 1"
        )
    try:
        dl.check_request(exp, args.nproc_per_node)
        requested = resolve_device(args.device)
        dl.check_device(requested, args.device, args.nproc_per_node)
    except dl.DistUsageError as e:
        raise UsageError(str(e)) from None
    device = dl.worker_device(requested) if dl.is_worker() else requested
    model, notice = model_for_run(args.model, args.patch_size, device)
    try:
        dit_cfg = build_dit_config(model, args.image_size, None, args.in_channels, args.num_classes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    image_size = dit_cfg["sample_size"] * 8
    if args.image_size is not None and image_size != args.image_size:  # defensive: build_dit_config accepted it
        raise UsageError(f"--image-size {args.image_size} is not a multiple of 8*patch_size")

    for flag, path in (("--output", args.output), ("--memory-snapshot", args.memory_snapshot)):
        if path is not None and (why := records.check_writable_output(path)):
            raise UsageError(why.replace("--output", flag))

    config = {
        "experiment": exp.name,
        "experiment_requested": args.experiment,
        "experiment_family": exp.family,
        # What the engine mode is made of (None for vanilla and upstream baselines): lets charts pair a sharded mode
        # with its single-process equivalent without importing the engine.
        "mode": None
        if exp.mode is None
        else {"norm": exp.mode.norm, "strategy": exp.mode.strategy, "sharding": exp.mode.sharding},
        "private": exp.private,
        "model": model,
        "image_size": image_size,
        "patch_size": dit_cfg["patch_size"],
        "in_channels": dit_cfg["in_channels"],
        "num_classes": dit_cfg["num_embeds_ada_norm"],
        "latent_shape": [dit_cfg["in_channels"], dit_cfg["sample_size"], dit_cfg["sample_size"]],
        "batch_size": args.batch_size,
        "noise_multiplicity": args.noise_multiplicity,
        "rows_per_step": args.batch_size * args.noise_multiplicity,
        "num_iter": args.num_iter,
        "warmup_iter": args.warmup_iter,
        "precision": args.precision,
        "tf32_matmul": device.type == "cuda",
        "autocast_dtype": "bfloat16" if args.precision == "bf16" else None,
        "device": str(requested),
        "use_flash_attention": args.use_flash_attention,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "noise_multiplier": args.noise_multiplier,
        "max_grad_norm": args.max_grad_norm,
        "seed": args.seed,
        "dataset_size": args.dataset_size,
        "delta": delta,
        "epochs": args.epochs,
        "accountant": args.accountant,
        "poisson_sampling": False,
        "data": "synthetic: fixed seeded N(0,1) latents and uniform labels; t and noise drawn every step",
        "class_dropout_prob": 0.1,
        "nproc_per_node": args.nproc_per_node,
        "world_size": args.nproc_per_node,
        "global_batch_size": args.batch_size * args.nproc_per_node,
        "fsdp2": args.nproc_per_node > 1,
        "memory_snapshot": args.memory_snapshot,
        "output": str(args.output),
    }
    notices = [notice] if notice else []
    if exp.private and args.noise_multiplier == 0:
        notices.append("--noise-multiplier 0 adds no noise: this configuration is not private (ε = ∞, null in JSON)")
    if args.nproc_per_node > 1 and requested.type == "cpu" and args.device == "auto" and not dl.is_worker():
        notices.append(f"no GPU: {args.nproc_per_node} CPU processes with gloo (pass --device cuda to require GPUs)")
    return config, device, notices


def parse_bracket(text: str | None) -> tuple[int, int] | None:
    """``"OK,OOM"`` -> (ok, oom) with 0 < ok < oom; UsageError otherwise."""
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"--max-batch-bracket takes OK,OOM (two batch sizes), got {text!r}")
    ok, oom = (int(p) for p in parts)
    if not 0 < ok < oom:
        raise UsageError(f"--max-batch-bracket needs 0 < OK < OOM, got {text!r}")
    return ok, oom


# ----- privacy line -------------------------------------------------------------------------------------------


def privacy_block(config: dict) -> dict | None:
    """σ, C, and ε at the stated δ for q = B/N over ceil(epochs*N/B) steps (Poisson-sampled DP-SGD assumed)."""
    if not config["private"]:
        return None
    from opacus.accountants import PRVAccountant, RDPAccountant

    n, b = config["dataset_size"], config.get("global_batch_size", config["batch_size"])  # N*B under torchrun
    q = b / n
    steps = math.ceil(config["epochs"] * n / b)
    sigma, delta = config["noise_multiplier"], config["delta"]
    out = {
        "noise_multiplier": sigma,
        "max_grad_norm": config["max_grad_norm"],
        "noise_std": sigma * config["max_grad_norm"],
        "delta": delta,
        "dataset_size": n,
        "batch_size": b,
        "sample_rate": q,
        "epochs": config["epochs"],
        "steps": steps,
        "accountant": config["accountant"],
        "privacy_unit": "one image (its K noise draws are averaged inside its per-sample loss)",
        "assumption": "ε is for DP-SGD with Poisson sampling at rate q = batch_size/dataset_size for `steps` steps; "
        "the benchmark itself feeds a fixed batch (no sampling), which does not change memory or time",
        "epsilon": None,
    }
    if sigma == 0:  # no noise: ε is infinite, which JSON cannot hold; null plus the reason, never a number
        out["epsilon_infinite"] = True
        out["epsilon_note"] = "noise_multiplier 0: no noise is added, so there is no privacy (ε is infinite)"
        return out
    accountant = PRVAccountant() if config["accountant"] == "prv" else RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    try:
        out["epsilon"] = float(accountant.get_epsilon(delta=delta))
    except Exception as e:  # the accountant's own limits (e.g. PRV domain): keep the run, say why
        out["epsilon_note"] = f"{config['accountant']} accountant failed: {type(e).__name__}: {e}"
    return out
