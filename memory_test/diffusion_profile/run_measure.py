"""One measured run of single_experiment.py: build, warm up, time, and turn the outcome into a record."""

from __future__ import annotations

import math
import os
import random
import time
import traceback

from memory_test.diffusion_profile.run_config import INJECT_OOM_ENV, privacy_block
from memory_test.profiling import records

# ----- one measured run ---------------------------------------------------------------------------------------


# What allocators say when memory runs out: CUDA (caching allocator, cuBLAS, cuDNN) and the CPU allocator.
OOM_MESSAGES = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
)


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m.lower() in msg for m in OOM_MESSAGES)


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

    from memory_test.models.dit_huggingface_wrapper import DiTHuggingFaceWrapper
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
