"""One measured run: build the model, prepare the experiment, warm up, time the steps, read every counter.

Each stage is one function; ``measure`` runs them in order and fills ``Partial`` as it goes, so that an oom or
error record keeps what was known (the model's size, the experiment's notes, the memory counters).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass

import torch

from memory_test.diffusion_profile.suite.experiments import (
    Prepared,
    RunContext,
    backends_of,
    norm_error_margin_of,
    resolve_experiment,
)
from memory_test.diffusion_profile.suite.train_step import make_train_step
from memory_test.models.dit_huggingface_wrapper import DiTHuggingFaceWrapper
from memory_test.privacy.compiled import compile_regions
from memory_test.profiling import memory_breakdown as mb
from memory_test.profiling.compile_stats import compile_stats
from memory_test.profiling.tracker import MemoryTracker, StepTimer, memory_snapshot
from memory_test.records.record import (
    Backends,
    CompileInfo,
    Distributed,
    Loss,
    Memory,
    ModelFacts,
    RunConfig,
    SnapshotInfo,
    Timing,
)
from memory_test.records.timing import summarize

# Test hook: a run whose batch is larger than this raises torch.cuda.OutOfMemoryError at its first step, so that the
# oom path, the sweep's skipping and the max-batch search can be exercised without a GPU. Recorded in env.
INJECT_OOM_ENV = "MEMORY_TEST_INJECT_OOM_ABOVE_BATCH"
# Test hook: compile with this torch.compile backend (e.g. aot_eager: traced like Inductor, without its build time).
# Recorded in the compile block.
COMPILE_BACKEND_ENV = "MEMORY_TEST_COMPILE_BACKEND"
# Compiled runs: warm-up goes on (after --warmup-iter steps) while a step still compiles, at most this many more.
MAX_EXTRA_WARMUP = 8

BREAKDOWN_SOURCES = {
    "weights": "measured: bytes of parameters and buffers",
    "gradients": "computed: one .grad per trainable parameter (an upper bound of what is live at the peak)",
    "optimizer_state": "measured: bytes of optimizer.state tensors after the last step",
}


@dataclass
class Partial:
    """What is known before a run fails: kept in its oom or error record."""

    tracker: MemoryTracker | None = None
    model: ModelFacts | None = None
    notes: dict | None = None


@dataclass(frozen=True)
class Measured:
    """The numbers of one process' run (one rank's, under torchrun, until ``WorkerContext.combine``)."""

    step_ms: list[float]
    timing: Timing
    memory: Memory
    backends: Backends
    loss: Loss
    snapshot: SnapshotInfo
    norm_error_margin: dict | None
    distributed: Distributed | None = None
    compile: CompileInfo | None = None


@dataclass(frozen=True)
class StepRun:
    step_ms: list[float]
    wall_ms: float | None
    final_loss: float
    snapshot: dict
    engine_peaks_reset: bool
    compile: CompileInfo | None = None


def measure(config: RunConfig, device, partial: Partial, dist=None) -> Measured:
    """Build, warm up, measure. ``dist``: a ``worker.WorkerContext`` inside a torchrun worker (FSDP2, this rank's
    slice of the global batch, results combined over ranks), else None."""
    device = pin_device(device)
    seed_everything(config.seed)
    set_precision(config)
    partial.tracker = tracker = MemoryTracker(device)  # before the model: its sampled baseline excludes the model
    model = build_model(config, device, dist)
    partial.model = model_facts(model, config, sharded=dist is not None)
    prepared = prepare_experiment(config, model, device)
    regions = compile_model(config, prepared, model)
    partial.model = partial.model.replace(trainable_params=trainable_params(model))
    partial.notes = prepared.notes
    step = make_step(config, prepared, device, dist)
    inject_oom_for_tests(config)
    run = run_steps(config, step, tracker, prepared, device, regions)
    measured = Measured(
        step_ms=run.step_ms,
        timing=timing_block(config, run, device),
        memory=memory_block(tracker.result(), model, prepared, device, run.engine_peaks_reset),
        backends=backends_block(model, prepared),
        loss=Loss(final_mean_loss=run.final_loss, finite=math.isfinite(run.final_loss)),
        snapshot=SnapshotInfo.from_dict(run.snapshot),
        norm_error_margin=norm_error_margin_of(prepared),
        compile=run.compile,
    )
    return dist.combine(measured, config) if dist is not None else measured


def pin_device(device):
    if device.type == "cuda":
        # A bare "cuda" has no index, which set_device rejects: pin the current device explicitly.
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_precision(config: RunConfig) -> None:
    # fp32 training as in DiT: TF32 tensor-core matmuls and convolutions.
    torch.backends.cuda.matmul.allow_tf32 = config.tf32_matmul
    torch.backends.cudnn.allow_tf32 = config.tf32_matmul


def build_model(config: RunConfig, device, dist=None) -> DiTHuggingFaceWrapper:
    # Initialised on the device itself: a CPU init of DiT-XL/2's 750M parameters costs seconds in every process.
    with torch.device(device):
        model = DiTHuggingFaceWrapper(
            model_name=config.model,
            img_size=config.image_size,
            in_channels=config.in_channels,
            num_classes=config.num_classes,
            pretrained=False,
            use_flash_attention=config.use_flash_attention,
            class_dropout_prob=config.class_dropout_prob,
        )
    model.to(device)
    if dist is not None:
        dist.shard(model)  # FSDP2, before the optimizer and make_private see the parameters
    return model


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_facts(model: DiTHuggingFaceWrapper, config: RunConfig, sharded: bool) -> ModelFacts:
    facts = model.facts
    return ModelFacts(
        name=config.model,
        params=sum(p.numel() for p in model.parameters()) if sharded else model.num_params,
        trainable_params=trainable_params(model),
        tokens_per_sample=model.tokens_per_sample,
        hidden_size=facts.hidden_size,
        num_layers=facts.num_layers,
        param_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


def prepare_experiment(config: RunConfig, model, device) -> Prepared:
    ctx = RunContext(
        device=device,
        batch_size=config.global_batch_size,  # the DP loader's batch: the global one under torchrun
        noise_multiplicity=config.noise_multiplicity,
        noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        optimizer=config.optimizer,
        lr=config.lr,
        seed=config.seed,
    )
    return resolve_experiment(config.experiment).prepare(model, ctx)


def compile_model(config: RunConfig, prepared: Prepared, model) -> int:
    """torch.compile the run's model by repeated block (regional); returns the regions compiled (0: eager).

    DP modes compile through the engine (``dp_model.compile``: sink recording, exact); vanilla compiles the same
    regions with ``compile_regions``, so that both sides of a ratio are compiled alike.
    """
    if config.compile == "off":
        return 0
    kwargs = {} if config.compile == "default" else {"mode": config.compile}
    if os.environ.get(COMPILE_BACKEND_ENV):
        kwargs["backend"] = os.environ[COMPILE_BACKEND_ENV]
    if prepared.engine is not None:
        prepared.engine.compile(regional=True, **kwargs)
        from memory_test.privacy.compiled import repeated_blocks

        return len(repeated_blocks(model))
    return compile_regions(model, regional=True, **kwargs)


def make_step(config: RunConfig, prepared: Prepared, device, dist=None):
    """The training step on a fixed seeded batch (this rank's rows of the global batch under torchrun)."""
    gen = torch.Generator().manual_seed(config.seed)  # CPU generator: same data on every device
    x0 = torch.randn(config.global_batch_size, *config.latent_shape, generator=gen)
    labels = torch.randint(0, config.num_classes, (config.global_batch_size,), generator=gen)
    rank = 0
    if dist is not None:  # this rank's contiguous slice of the seeded global batch
        x0, labels, rank = dist.local_rows(x0, config.batch_size), dist.local_rows(labels, config.batch_size), dist.rank
    return make_train_step(
        prepared,
        x0.to(device),
        labels.to(device),
        noise_multiplicity=config.noise_multiplicity,
        autocast_dtype=torch.bfloat16 if config.precision == "bf16" else None,
        seed=config.seed + 1000 * rank,  # t and noise: independent draws on every rank
    )


def inject_oom_for_tests(config: RunConfig) -> None:
    limit = os.environ.get(INJECT_OOM_ENV)
    if limit is not None and config.batch_size > int(limit):
        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory (injected for testing: {INJECT_OOM_ENV}={limit} < batch {config.batch_size})"
        )


def run_steps(config: RunConfig, step, tracker: MemoryTracker, prepared: Prepared, device, regions=0) -> StepRun:
    """Warm-up steps (compiled runs: until a step compiles nothing), every peak counter reset, the timed steps."""
    with memory_snapshot(config.memory_snapshot, device) as snap:
        warm = compiled_warmup(config, step, device) if regions else plain_warmup(config, step)
        before_timing = compile_stats()
        tracker.reset_peaks()
        engine_reset = prepared.engine is not None
        if engine_reset:
            prepared.engine.reset_peaks()
        timer = StepTimer(device)
        loss = None
        for _ in range(config.num_iter):
            with timer.step():
                loss = step()
        step_ms = timer.finish()
    during = compile_stats().since(before_timing)
    info = compile_info(config, warm, step_ms, regions, during, prepared.engine) if regions else None
    return StepRun(step_ms, timer.wall_ms, float(loss), snap, engine_reset, info)


def plain_warmup(config: RunConfig, step) -> None:
    for _ in range(config.warmup_iter):
        step()


@dataclass(frozen=True)
class Warmup:
    compiling_ms: list  # wall time of each warm-up step that compiled something
    steps: int
    stats: object  # CompileStats of the whole warm-up


def compiled_warmup(config: RunConfig, step, device) -> Warmup:
    """At least --warmup-iter steps, then on until a step after the compiling ones compiles nothing, so that timing
    excludes compiling. (A DP model's first step of an input signature runs eagerly: its compile comes second.)"""
    start, compiling_ms, steps = compile_stats(), [], 0
    while steps < max(2, config.warmup_iter) + MAX_EXTRA_WARMUP:
        before, t0 = compile_stats(), time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        steps += 1
        compiled = compile_stats().since(before)
        if compiled.graphs or compiled.recompiles:
            compiling_ms.append((time.perf_counter() - t0) * 1e3)
        elif compiling_ms and steps >= config.warmup_iter:
            break
    return Warmup(compiling_ms, steps, compile_stats().since(start))


def compile_info(config: RunConfig, warm: Warmup, step_ms: list, regions: int, during, engine=None) -> CompileInfo:
    typical = sorted(step_ms)[len(step_ms) // 2]
    return CompileInfo(
        mode=config.compile,
        backend=os.environ.get(COMPILE_BACKEND_ENV) or "inductor",
        regions=regions,
        compile_ms=sum(max(0.0, t - typical) for t in warm.compiling_ms),
        warmup_steps=warm.steps,
        graphs=warm.stats.graphs,
        graph_breaks=warm.stats.graph_breaks,
        recompiles=warm.stats.recompiles,
        during_timing=during.as_dict(),
        post_programs=engine.stats().post_programs if engine is not None else None,
    )


def timing_block(config: RunConfig, run: StepRun, device) -> Timing:
    return summarize(
        run.step_ms,
        config.batch_size,
        config.noise_multiplicity,
        method="cuda_events" if device.type == "cuda" else "perf_counter",
        warmup_steps=config.warmup_iter,
        measured_steps=config.num_iter,
        measured_wall_ms=run.wall_ms,
    )


def peak_to_explain(counters: dict, device) -> tuple[int | None, str]:
    """The peak the breakdown explains, and how it was measured."""
    if device.type == "cuda":
        return counters["peak_allocated_bytes"], "torch.cuda.max_memory_allocated (after warm-up)"
    if counters["sampled_peak_bytes"] is not None and counters["sampled_baseline_bytes"] is not None:
        return (
            counters["sampled_peak_bytes"] - counters["sampled_baseline_bytes"],
            "process RSS growth since before the model was built (sampled; CPU has no allocator peak)",
        )
    return None, "not available"


def memory_block(counters: dict, model, prepared: Prepared, device, engine_reset: bool) -> Memory:
    """The tracker's counters, and the breakdown of the peak with the experiment's DP state as its own part."""
    total, total_source = peak_to_explain(counters, device)
    parts = {
        "weights": mb.weight_bytes(model),
        # one .grad per trainable parameter, allocated each step (freed by zero_grad(set_to_none=True))
        "gradients": mb.trainable_param_bytes(model),
        "optimizer_state": mb.optimizer_state_bytes(prepared.base_optimizer),
        "dp_state": prepared.dp_state_bytes(),
    }
    breakdown = mb.build_breakdown(total, parts, overlapping=("dp_state",) if prepared.dp_state_overlaps else ())
    breakdown["total_source"] = total_source
    breakdown["sources"] = {
        **BREAKDOWN_SOURCES,
        "dp_state": prepared.dp_state_source or "not available for this experiment (counted in the remainder)",
        mb.REMAINDER: "derived: total - sum of the other parts",
    }
    if prepared.engine is not None:
        breakdown["dp_state_counter_reset_after_warmup"] = engine_reset
    return Memory.from_dict({**counters, "breakdown": breakdown, "total_bytes": total})


def backends_block(model: DiTHuggingFaceWrapper, prepared: Prepared) -> Backends:
    return Backends(
        attention=model.attention_backend,
        attention_fallbacks=dict(model.attention_processor.fallbacks),
        **backends_of(prepared),
    )
