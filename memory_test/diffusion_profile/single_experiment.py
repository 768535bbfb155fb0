#!/usr/bin/env python3
"""Profile one DiT training configuration (vanilla, upstream Opacus or an engine DP mode) and write one JSON record.

Each run is its own process: a fixed synthetic batch (seeded VAE-sized latents and labels; fresh t and noise each
step, DiT's epsilon objective), ``--warmup-iter`` steps, then the peak counters are reset and ``--num-iter`` steps
are timed with CUDA events (perf_counter on CPU). The record (schema: docs/RESULTS_SCHEMA.md) is written atomically.

Exit codes: 0 ok, 1 the run failed (an "error" record was written), 2 bad input (nothing written), 3 out of memory
(an "oom" record was written).

Examples:
    python -m memory_test.diffusion_profile.single_experiment --experiment bookkeeping --batch-size 32 \\
        --output results/bk_32.json
    python memory_test/diffusion_profile/single_experiment.py --experiment vanilla --find-max-batch --output max.json
    # 2 GPUs, FSDP2 (torchrun is started here): per-GPU batch 16, global batch 32
    python -m memory_test.diffusion_profile.single_experiment --experiment ghost_fsdp_bk --nproc-per-node 2 \\
        --batch-size 16 --output results/ghost_fsdp_bk_w2.json

With ``--nproc-per-node N`` > 1 (sharded modes, and ``vanilla`` as a plain FSDP2 baseline) the run re-launches
itself under ``torchrun --standalone``; ``--batch-size`` is then the per-GPU batch (see distributed_launch.py).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python single_experiment.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from memory_test.diffusion_profile import distributed_launch as dl
from memory_test.diffusion_profile.dit_models import DIT_MODELS, build_dit_config, resolve_model_name
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
    """Bad input: reported on stderr, exit code 2, no record written."""


# ----- command line -------------------------------------------------------------------------------------------


def build_parser(experiment_names: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="single_experiment.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
                f"CUDA build: {torch.version.cuda}); use --device cpu (or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        raise UsageError(f"--device {name!r}: only cpu and cuda are supported")
    return dev


def _model_name(requested: str | None, patch_size: int | None, device) -> tuple[str, str | None]:
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
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if not args.epochs > 0:
        raise UsageError(f"--epochs must be > 0, got {args.epochs}")
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
    model, notice = _model_name(args.model, args.patch_size, device)
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
    if args.nproc_per_node > 1 and requested.type == "cpu" and args.device == "auto" and not dl.is_worker():
        notices.append(f"no GPU: {args.nproc_per_node} CPU processes with gloo (pass --device cuda to require GPUs)")
    return config, device, notices


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
    if sigma == 0:
        out["epsilon_note"] = "noise_multiplier 0: no privacy (ε is infinite)"
        return out
    accountant = PRVAccountant() if config["accountant"] == "prv" else RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    try:
        out["epsilon"] = float(accountant.get_epsilon(delta=delta))
    except Exception as e:  # the accountant's own limits (e.g. PRV domain): keep the run, say why
        out["epsilon_note"] = f"{config['accountant']} accountant failed: {type(e).__name__}: {e}"
    return out


# ----- one measured run ---------------------------------------------------------------------------------------


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in msg or "CUDNN_STATUS_ALLOC_FAILED" in msg
    )


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _set_precision(config: dict) -> None:
    import torch

    # fp32 training as in DiT: TF32 tensor-core matmuls and convolutions.
    torch.backends.cuda.matmul.allow_tf32 = config["tf32_matmul"]
    torch.backends.cudnn.allow_tf32 = config["tf32_matmul"]


def measure(config: dict, device, partial: dict, dist=None) -> dict:
    """Build, warm up, measure. Fills ``partial`` as it goes so that an oom/error record keeps what is known.

    ``dist``: a ``distributed_launch.WorkerContext`` inside a torchrun worker (FSDP2, this rank's slice of the
    global batch, results gathered over ranks), else None.
    """
    import torch

    from memory_test.diffusion_profile.dit_huggingface_wrapper import DiTHuggingFaceWrapper
    from memory_test.diffusion_profile.experiments import (
        RunContext,
        dp_backend_info,
        make_train_step,
        reset_dp_state_peak,
        resolve_experiment,
    )
    from memory_test.profiling import memory_breakdown as mb
    from memory_test.profiling.tracker import MemoryTracker, StepTimer, memory_snapshot, timing_summary

    exp = resolve_experiment(config["experiment"])
    _seed_everything(config["seed"])
    _set_precision(config)
    if device.type == "cuda":
        # A bare "cuda" has no index, which set_device rejects: pin the current device explicitly.
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    tracker = MemoryTracker(device)  # before the model exists: its sampled baseline excludes the model
    partial["tracker"] = tracker

    # Initialised on the device itself: a CPU init of DiT-XL/2's 750M parameters costs seconds in every process.
    with torch.device(device):
        model = DiTHuggingFaceWrapper(
            model_name=config["model"],
            img_size=config["image_size"],
            in_channels=config["in_channels"],
            num_classes=config["num_classes"],
            pretrained=False,
            use_flash_attention=config["use_flash_attention"],
            class_dropout_prob=config["class_dropout_prob"],
        )
    model.to(device)
    if dist is not None:
        dist.shard(model)  # FSDP2, before the optimizer and make_private see the parameters
    facts = model.facts
    partial["model"] = {
        "name": config["model"],
        "params": model.num_params if dist is None else sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tokens_per_sample": model.tokens_per_sample,
        "hidden_size": facts.hidden_size,
        "num_layers": facts.num_layers,
        "param_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    ctx = RunContext(
        device=device,
        batch_size=config["global_batch_size"],  # the DP loader's batch: the global one under torchrun
        noise_multiplicity=config["noise_multiplicity"],
        noise_multiplier=config["noise_multiplier"],
        max_grad_norm=config["max_grad_norm"],
        optimizer=config["optimizer"],
        lr=config["lr"],
        seed=config["seed"],
    )
    prepared = exp.prepare(model, ctx)
    partial["model"]["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    partial["experiment_notes"] = prepared.notes

    gen = torch.Generator().manual_seed(config["seed"])  # CPU generator: same data on every device
    b, rank = config["batch_size"], dist.rank if dist is not None else 0
    x0 = torch.randn(config["global_batch_size"], *config["latent_shape"], generator=gen)
    labels = torch.randint(0, config["num_classes"], (config["global_batch_size"],), generator=gen)
    if dist is not None:  # this rank's contiguous slice of the seeded global batch
        x0, labels = dist.local_rows(x0, b), dist.local_rows(labels, b)
    x0, labels = x0.to(device), labels.to(device)
    step = make_train_step(
        prepared,
        x0,
        labels,
        noise_multiplicity=config["noise_multiplicity"],
        autocast_dtype=torch.bfloat16 if config["precision"] == "bf16" else None,
        seed=config["seed"] + 1000 * rank,  # t and noise: independent draws on every rank
    )
    inject = os.environ.get(INJECT_OOM_ENV)
    if inject is not None and config["batch_size"] > int(inject):
        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory (injected for testing: {INJECT_OOM_ENV}={inject} < batch {config['batch_size']})"
        )

    with memory_snapshot(config["memory_snapshot"], device) as snap:
        for _ in range(config["warmup_iter"]):
            step()
        tracker.reset_peaks()
        dp_peak_reset = reset_dp_state_peak(prepared.model)
        timer = StepTimer(device)
        loss = None
        for _ in range(config["num_iter"]):
            with timer.step():
                loss = step()
        step_ms = timer.finish()
    mem = tracker.result()
    loss_value = float(loss)

    timing = timing_summary(step_ms, config["batch_size"])
    timing.update(
        {
            "rows_per_s": timing["samples_per_s"] * config["noise_multiplicity"] if timing["samples_per_s"] else None,
            "method": "cuda_events" if device.type == "cuda" else "perf_counter",
            "warmup_steps": config["warmup_iter"],
            "measured_steps": config["num_iter"],
            "measured_wall_ms": timer.wall_ms,
        }
    )

    if device.type == "cuda":
        total, total_source = mem["peak_allocated_bytes"], "torch.cuda.max_memory_allocated (after warm-up)"
    elif mem["sampled_peak_bytes"] is not None and mem["sampled_baseline_bytes"] is not None:
        total = mem["sampled_peak_bytes"] - mem["sampled_baseline_bytes"]
        total_source = "process RSS growth since before the model was built (sampled; CPU has no allocator peak)"
    else:
        total, total_source = None, "not available"
    dp_state = prepared.dp_state_bytes()
    breakdown = mb.build_breakdown(
        total,
        {
            "weights": mb.weight_bytes(model),
            # one .grad per trainable parameter, allocated each step (freed by zero_grad(set_to_none=True))
            "gradients": mb.trainable_param_bytes(model),
            "optimizer_state": mb.optimizer_state_bytes(prepared.base_optimizer),
            "dp_state": dp_state,
        },
    )
    breakdown["total_source"] = total_source
    breakdown["sources"] = {
        "weights": "measured: bytes of parameters and buffers",
        "gradients": "computed: one .grad per trainable parameter (an upper bound of what is live at the peak)",
        "optimizer_state": "measured: bytes of optimizer.state tensors after the last step",
        "dp_state": prepared.dp_state_source or "not available for this experiment (counted in the remainder)",
        "activations_and_other": "derived: total - sum of the other parts",
    }
    if dp_state is not None and prepared.dp_state_source and prepared.dp_state_source.startswith("measured"):
        breakdown["dp_state_counter_reset_after_warmup"] = dp_peak_reset
    mem["breakdown"] = breakdown
    mem["total_bytes"] = total

    backends = {
        "attention": model.attention_backend,
        "attention_fallbacks": dict(getattr(model.attention_processor, "fallbacks", {}) or {}),
    }
    backends.update(dp_backend_info(prepared.model) if exp.private else {"kernel_backend": None})
    result = {
        "peak_memory_mb": total / 2**20 if total is not None else None,
        "avg_time_ms": timing["mean_ms"],
        "timing": timing,
        "memory": mem,
        "backends": backends,
        "loss": {"final_mean_loss": loss_value, "finite": math.isfinite(loss_value)},
        "memory_snapshot": snap,
    }
    if dist is not None:
        result = dist.combine(result, step_ms, config["batch_size"], config["noise_multiplicity"])
    return result


def base_record(config: dict, env: dict, record_type: str = "run") -> dict:
    return {
        "schema": records.SCHEMA_NAME,
        "schema_version": records.SCHEMA_VERSION,
        "record_type": record_type,
        "experiment": config["experiment"],
        "status": None,
        "message": None,
        "exit_code": None,
        "config": config,
        "model": None,
        "peak_memory_mb": None,
        "avg_time_ms": None,
        "timing": None,
        "memory": None,
        "backends": None,
        "privacy": privacy_block(config),
        "experiment_notes": None,
        "env": env,
    }


def _env(device) -> dict:
    from memory_test.profiling.environment import environment

    env = environment(device)
    if os.environ.get(INJECT_OOM_ENV) is not None:
        env["fault_injection"] = {INJECT_OOM_ENV: os.environ[INJECT_OOM_ENV]}
    return env


def run_and_record(config: dict, device, dist=None) -> tuple[dict, int]:
    t0 = time.perf_counter()
    rec = base_record(config, _env(device))
    partial: dict = {}
    try:
        result = measure(config, device, partial, dist)
        rec.update(result)
        rec["status"], code = "ok", records.EXIT_OK
    except Exception as exc:
        oom = _is_oom(exc)
        rec["status"], code = ("oom", records.EXIT_OOM) if oom else ("error", records.EXIT_ERROR)
        rec["message"] = f"{type(exc).__name__}: {exc}".strip()[:4000]
        if not oom:
            rec["traceback_tail"] = traceback.format_exc().splitlines()[-25:]
        tracker = partial.get("tracker")
        if tracker is not None:
            try:
                rec["memory"] = {"at_failure": tracker.result()}
            except Exception:
                pass
    for key in ("model", "experiment_notes"):
        if partial.get(key) is not None and rec.get(key) is None:
            rec[key] = partial[key]
    rec["exit_code"] = code
    rec["duration_s"] = time.perf_counter() - t0
    return rec, code


# ----- max batch search ---------------------------------------------------------------------------------------


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


def search_max_batch(
    probe, start: int, limit: int, resolution: int = 1, bracket: tuple[int, int] | None = None
) -> tuple[int, int | None, bool]:
    """Largest batch for which ``probe(b)`` is "ok": double from ``start`` until a failure or ``limit``, then bisect.

    ``probe`` returns "ok" or "oom" (raise to abort). A known (ok, oom) ``bracket`` replaces the doubling. Returns
    (max_ok (0 if none), smallest oom seen or None, whether the limit was reached without an oom).
    """
    if bracket is not None:
        ok, bad = bracket
        return _bisect(probe, ok, bad, resolution)
    ok, bad = 0, None
    b = min(start, limit)
    while True:
        if probe(b) == "ok":
            ok = b
            if b >= limit:
                return ok, None, True
            b = min(2 * b, limit)
        else:
            bad = b
            break
    return _bisect(probe, ok, bad, resolution)


def _bisect(probe, ok: int, bad: int, resolution: int) -> tuple[int, int | None, bool]:
    while bad - ok > resolution:
        mid = (ok + bad) // 2
        if probe(mid) == "ok":
            ok = mid
        else:
            bad = mid
    return ok, bad, False


class ProbeFailed(RuntimeError):
    pass


def config_to_argv(config: dict) -> list[str]:
    """Command-line flags reproducing ``config`` (the batch size and iteration counts are set by the caller)."""
    argv = [
        "--experiment", config["experiment"], "--model", config["model"],
        "--image-size", str(config["image_size"]), "--in-channels", str(config["in_channels"]),
        "--num-classes", str(config["num_classes"]), "--precision", config["precision"],
        "--device", config["device"], "--optimizer", config["optimizer"], "--lr", repr(config["lr"]),
        "--noise-multiplier", repr(config["noise_multiplier"]), "--max-grad-norm", repr(config["max_grad_norm"]),
        "--seed", str(config["seed"]), "--noise-multiplicity", str(config["noise_multiplicity"]),
        "--dataset-size", str(config["dataset_size"]), "--delta", repr(config["delta"]),
        "--epochs", repr(config["epochs"]), "--accountant", config["accountant"],
    ]  # fmt: skip
    argv.append("--use-flash-attention" if config["use_flash_attention"] else "--no-flash-attention")
    if config.get("nproc_per_node", 1) > 1:  # each probe is its own torchrun launch
        argv += ["--nproc-per-node", str(config["nproc_per_node"])]
    return argv


def find_max_batch(config: dict, device, args: argparse.Namespace) -> tuple[dict, int]:
    """Doubling then bisection; each probe is a fresh ``single_experiment`` process with a few iterations."""
    t0 = time.perf_counter()
    limit = args.max_batch_limit or (65536 if device.type == "cuda" else 64)
    start = args.max_batch_start or config["batch_size"]
    search = {
        "method": "doubling from start, then bisection between the last ok and the first oom batch",
        "start": start,
        "limit": limit,
        "resolution": args.max_batch_resolution,
        "probe_num_iter": args.probe_num_iter,
        "probe_warmup_iter": args.probe_warmup_iter,
        "probe_timeout_s": args.probe_timeout,
    }
    if args.max_batch_bracket is not None:
        ok, oom = args.max_batch_bracket
        search["method"] = "bisection between a batch known to run and one known to run out of memory"
        search["bracket"] = {"ok_batch_size": ok, "oom_batch_size": oom, "source": "--max-batch-bracket"}
        search["start"] = None  # no doubling
    if device.type != "cuda":
        search["note"] = "on CPU nothing raises out-of-memory: the search stops at the limit"
    out = Path(args.output)
    probe_dir = out.parent / f".{out.name}.probes"
    probe_dir.mkdir(parents=True, exist_ok=True)
    probes: list[dict] = []
    best: dict = {}

    def probe(b: int) -> str:
        path = probe_dir / f"bs{b}.json"
        cmd = [sys.executable, "-m", "memory_test.diffusion_profile.single_experiment", *config_to_argv(config)]
        cmd += ["--batch-size", str(b), "--num-iter", str(args.probe_num_iter)]
        cmd += ["--warmup-iter", str(args.probe_warmup_iter), "--output", str(path)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        print(f"[find-max-batch] {config['experiment']}: probing batch {b} ...", file=sys.stderr, flush=True)
        pt = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.probe_timeout)
            code, tail = r.returncode, (r.stderr or "").strip().splitlines()[-5:]
        except subprocess.TimeoutExpired:
            code, tail = None, [f"probe timed out after {args.probe_timeout}s"]
        rec, why = records.load_record(path) if path.exists() else (None, "no record written")
        entry = {"batch_size": b, "exit_code": code, "wall_s": round(time.perf_counter() - pt, 2)}
        if rec is None:
            entry.update(status="error", message=f"{why}; stderr tail: {' | '.join(tail)}")
        else:
            mem, timing = rec.get("memory") or {}, rec.get("timing") or {}
            entry.update(
                status=rec["status"],
                message=rec.get("message"),
                peak_allocated_bytes=mem.get("peak_allocated_bytes"),
                total_bytes=mem.get("total_bytes"),
                median_ms=timing.get("median_ms"),
                samples_per_s=timing.get("samples_per_s"),
            )
        probes.append(entry)
        print(f"[find-max-batch]   batch {b}: {entry['status']}", file=sys.stderr, flush=True)
        if entry["status"] == "ok":
            if not best or b > best["config"]["batch_size"]:
                best.clear()
                best.update(rec)
            return "ok"
        if entry["status"] == "oom":
            return "oom"
        raise ProbeFailed(f"probe at batch {b} failed: {entry['message']}")

    result_cfg = dict(config, find_max_batch=search)
    rec = base_record(result_cfg, _env(device), record_type="max_batch")
    try:
        max_ok, first_oom, limit_reached = search_max_batch(
            probe, start, limit, args.max_batch_resolution, bracket=args.max_batch_bracket
        )
        if max_ok == 0:
            rec["status"], code = "oom", records.EXIT_OOM
            rec["message"] = f"even batch {first_oom} ran out of memory"
        else:
            rec["status"], code = "ok", records.EXIT_OK
        rec["max_batch"] = {"max_batch_size": max_ok, "first_oom_batch_size": first_oom, "limit_reached": limit_reached}
    except ProbeFailed as e:
        rec["status"], code, rec["message"] = "error", records.EXIT_ERROR, str(e)
        rec["max_batch"] = {"max_batch_size": None, "first_oom_batch_size": None, "limit_reached": False}
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    rec["max_batch"]["probes"] = probes
    if best:
        rec["config"]["batch_size"] = best["config"]["batch_size"]
        rec["config"]["rows_per_step"] = best["config"]["rows_per_step"]
        rec["config"]["num_iter"], rec["config"]["warmup_iter"] = args.probe_num_iter, args.probe_warmup_iter
        rec["privacy"] = privacy_block(rec["config"])
        for key in ("model", "peak_memory_mb", "avg_time_ms", "timing", "memory", "backends", "experiment_notes"):
            rec[key] = best.get(key)
        if best.get("distributed") is not None:  # a probe over N > 1 processes
            rec["distributed"] = best["distributed"]
    elif rec["status"] == "ok":  # every probe ran out of memory: the bracket's ok batch is the answer
        b = rec["max_batch"]["max_batch_size"]
        rec["config"]["batch_size"], rec["config"]["rows_per_step"] = b, b * config["noise_multiplicity"]
        if "global_batch_size" in rec["config"]:
            rec["config"]["global_batch_size"] = b * config.get("nproc_per_node", 1)
        rec["privacy"] = privacy_block(rec["config"])
    rec["exit_code"] = code
    rec["duration_s"] = time.perf_counter() - t0
    return rec, code


# ----- entry point --------------------------------------------------------------------------------------------


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # the benchmark seeds its noise on purpose
    signal.signal(signal.SIGTERM, _terminate)  # unwind like Ctrl-C: no record, probe processes killed
    from memory_test.diffusion_profile.experiments import experiment_names

    parser = build_parser(experiment_names())
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        config, device, notices = validate(args)
    except UsageError as e:
        print(f"{parser.prog}: error: {e} (see --help)", file=sys.stderr)
        return records.EXIT_USAGE
    for n in notices:
        print(f"note: {n}", file=sys.stderr)

    if args.record_only:
        rec = base_record(config, _env(device), record_type="max_batch" if args.find_max_batch else "run")
        if args.find_max_batch:
            rec["max_batch"] = {"max_batch_size": None, "first_oom_batch_size": None, "probes": []}
        message = args.record_message or f"recorded as {args.record_only} without running"
        rec.update(status=args.record_only, message=message, exit_code=None, recorded_by="sweep")
        records.write_record_atomic(args.output, rec)
        return records.EXIT_OK
    if dl.is_worker():  # one rank of a torchrun launch (started below, by the parent process)
        if args.find_max_batch:
            print(f"{parser.prog}: error: --find-max-batch runs in the launching process", file=sys.stderr)
            return records.EXIT_USAGE
        return dl.run_worker(config, device, report)
    if args.find_max_batch:
        rec, code = find_max_batch(config, device, args)
    elif args.nproc_per_node > 1:
        return dl.launch(argv, config, device, report)
    else:
        rec, code = run_and_record(config, device)
    records.write_record_atomic(args.output, rec)
    report(rec, config)
    return code


def report(rec: dict, config: dict) -> None:
    """One console line about a written record."""
    summary = f"{config['experiment']} batch={rec['config']['batch_size']} {config['precision']} {config['device']}"
    if config.get("nproc_per_node", 1) > 1:
        summary += f" x{config['nproc_per_node']} processes"
    out = config["output"]
    if rec["status"] == "ok" and rec["record_type"] == "max_batch":
        print(f"{summary}: max batch {rec['max_batch']['max_batch_size']} -> {out}")
    elif rec["status"] == "ok":
        t, m = rec["timing"], rec["memory"]
        peak = m.get("total_bytes")
        peak_s = f"{peak / 2**20:.1f} MiB" if peak is not None else "n/a"
        print(f"{summary}: peak {peak_s}, median step {t['median_ms']:.2f} ms{dl.describe(rec)} -> {out}")
    else:
        print(f"{summary}: {rec['status'].upper()}: {rec['message']} -> {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
