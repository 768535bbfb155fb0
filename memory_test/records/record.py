"""The result record and its blocks (schema ``memory_test.dit_profile``; docs/RESULTS_SCHEMA.md).

Version 2 adds ``memory.breakdown.overlapping`` (parts measured on their own that share storage with the remainder:
the engine's caches) and ``privacy.norm_error_margin`` (the engine's clipping margins). Version 1 records are read
into the same types: what they lack is derived here once (``world_size`` from ``nproc_per_node``, the engine
modes' ``overlapping``), so no reader needs ``config.get(a, config[b])``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memory_test.records.fields import (
    BOOL,
    INT,
    NON_NEGATIVE,
    NUMBER,
    OBJECT,
    POSITIVE_INT,
    STR,
    Block,
    ListOf,
    MapOf,
    Nested,
    extra_keys,
    one_of,
    spec,
)

SCHEMA_NAME = "memory_test.dit_profile"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
STATUSES = ("ok", "oom", "error", "skipped")
RECORD_TYPES = ("run", "max_batch")
COMPILE_SETTINGS = ("off", "default", "max-autotune", "reduce-overhead")  # config.compile: single_experiment --compile
REMAINDER = "activations_and_other"  # the derived part of a memory breakdown
# Step times whose 80th percentile exceeds the 20th by more than this are too spread for a ratio to mean much.
NOISY_SPREAD = 1.2


@dataclass(frozen=True)
class MaxBatchSearch(Block):
    """``config.find_max_batch``: how a max-batch search was run."""

    method: str | None = spec(STR)
    start: int | None = spec(INT)
    limit: int | None = spec(INT)
    resolution: int | None = spec(INT)
    probe_num_iter: int | None = spec(INT, omit_none=True)
    probe_warmup_iter: int | None = spec(INT, omit_none=True)
    probe_timeout_s: float | None = spec(NUMBER, omit_none=True)
    bracket: dict | None = spec(OBJECT, omit_none=True)  # ok_batch_size, oom_batch_size, source
    note: str | None = spec(STR, omit_none=True)
    extra: dict = extra_keys()


@dataclass(frozen=True)
class RunConfig(Block):
    """The full effective configuration of one run (``config``). With N > 1 processes, batch sizes are per GPU."""

    experiment: str = spec(STR, required=True)
    experiment_requested: str | None = spec(STR)
    experiment_family: str | None = spec(STR)  # baseline | upstream_opacus | engine
    mode: dict | None = spec(OBJECT)  # engine modes: norm, strategy, sharding (absent in early v1 records)
    private: bool | None = spec(BOOL)
    model: str = spec(STR, required=True)
    image_size: int = spec(POSITIVE_INT, required=True)
    patch_size: int | None = spec(INT)
    in_channels: int | None = spec(INT)
    num_classes: int | None = spec(INT)
    latent_shape: list | None = spec(ListOf(INT))
    batch_size: int = spec(POSITIVE_INT, required=True)
    noise_multiplicity: int = spec(POSITIVE_INT, default=1)
    rows_per_step: int | None = spec(POSITIVE_INT)
    num_iter: int | None = spec(INT)
    warmup_iter: int | None = spec(INT)
    precision: str = spec(STR, required=True)
    tf32_matmul: bool | None = spec(BOOL)
    autocast_dtype: str | None = spec(STR)
    device: str | None = spec(STR)
    use_flash_attention: bool = spec(BOOL, default=True)
    optimizer: str | None = spec(STR)
    lr: float | None = spec(NUMBER)
    noise_multiplier: float | None = spec(NUMBER)
    max_grad_norm: float | None = spec(NUMBER)
    seed: int | None = spec(INT)
    dataset_size: int | None = spec(INT)
    delta: float | None = spec(NUMBER)
    epochs: float | None = spec(NUMBER)
    accountant: str | None = spec(STR)
    poisson_sampling: bool | None = spec(BOOL)
    data: str | None = spec(STR)
    class_dropout_prob: float | None = spec(NUMBER)
    nproc_per_node: int = spec(POSITIVE_INT, default=1)
    world_size: int = spec(POSITIVE_INT, default=1)
    global_batch_size: int | None = spec(POSITIVE_INT)
    fsdp2: bool | None = spec(BOOL)
    memory_snapshot: str | None = spec(STR)
    # torch.compile mode of the model (off: eager); absent before: off
    compile: str = spec(one_of(COMPILE_SETTINGS), default="off")
    output: str | None = spec(STR)
    find_max_batch: MaxBatchSearch | None = spec(Nested(MaxBatchSearch), omit_none=True)
    extra: dict = extra_keys()

    @classmethod
    def _upgraded(cls, values: dict, extra: dict, data: dict):
        nproc = values.get("nproc_per_node", 1)
        values.setdefault("world_size", nproc)  # v1 records before multi-GPU runs
        values.setdefault("global_batch_size", values["batch_size"] * nproc)
        values.setdefault("fsdp2", nproc > 1)
        if "private" not in values:
            values["private"] = values["experiment"] != "vanilla"
        return cls(**values, extra=extra)

    @property
    def attention(self) -> str:
        return "flash" if self.use_flash_attention else "no-flash"


@dataclass(frozen=True)
class ModelFacts(Block):
    name: str | None = spec(STR)
    params: int | None = spec(INT)
    trainable_params: int | None = spec(INT)
    tokens_per_sample: int | None = spec(INT)
    hidden_size: int | None = spec(INT)
    num_layers: int | None = spec(INT)
    param_dtype: str | None = spec(STR)
    extra: dict = extra_keys()


@dataclass(frozen=True)
class Timing(Block):
    """Per-step times of the measured steps (ms) and their statistics."""

    step_times_ms: list = spec(ListOf(NON_NEGATIVE), default=[])
    median_ms: float | None = spec(NON_NEGATIVE)
    p20_ms: float | None = spec(NON_NEGATIVE)
    p80_ms: float | None = spec(NON_NEGATIVE)
    mean_ms: float | None = spec(NON_NEGATIVE)
    min_ms: float | None = spec(NON_NEGATIVE)
    max_ms: float | None = spec(NON_NEGATIVE)
    samples_per_s: float | None = spec(NON_NEGATIVE)
    rows_per_s: float | None = spec(NON_NEGATIVE)
    method: str | None = spec(STR)  # cuda_events | perf_counter
    warmup_steps: int | None = spec(INT)
    measured_steps: int | None = spec(INT)
    measured_wall_ms: float | None = spec(NON_NEGATIVE)
    step_time_reduction: str | None = spec(STR, omit_none=True)  # runs over N > 1 processes
    rank0_step_times_ms: list | None = spec(ListOf(NON_NEGATIVE), omit_none=True)
    extra: dict = extra_keys()

    @property
    def spread(self) -> float | None:
        """p80 / p20 of the step times: 1.0 for perfectly steady steps."""
        if self.p20_ms is None or self.p80_ms is None or self.p20_ms <= 0:
            return None
        return self.p80_ms / self.p20_ms

    @property
    def noisy(self) -> bool:
        return self.spread is not None and self.spread > NOISY_SPREAD


@dataclass(frozen=True)
class Breakdown(Block):
    """Where the peak went. ``parts_bytes`` sums to ``total_bytes``; the remainder is derived.

    ``overlapping`` names parts measured on their own whose storage the remainder also holds (the engine's caches
    are partly the activations autograd saves): drawing them stacked would count them twice.
    """

    total_bytes: int | None = spec(NUMBER)
    parts_bytes: dict = spec(MapOf(NUMBER), default={})
    measured: list = spec(ListOf(STR), default=[])
    derived: list = spec(ListOf(STR), default=[])
    not_available: list = spec(ListOf(STR), default=[])
    overlapping: list = spec(ListOf(STR), default=[])  # v2
    total_source: str | None = spec(STR)
    sources: dict = spec(MapOf(STR), default={})
    note: str | None = spec(STR, omit_none=True)
    dp_state_counter_reset_after_warmup: bool | None = spec(BOOL, omit_none=True)
    extra: dict = extra_keys()

    @property
    def stacked_bytes(self) -> dict[str, float]:
        """The disjoint parts, bottom to top, with the overlapping ones added back into the remainder (>= 0 on a
        GPU, where the total is the allocator's peak)."""
        parts = {k: v or 0 for k, v in self.parts_bytes.items() if k not in self.overlapping}
        if REMAINDER in parts:
            parts[REMAINDER] += sum(self.parts_bytes.get(k) or 0 for k in self.overlapping)
        return parts

    @property
    def overlapping_bytes(self) -> dict[str, float]:
        return {k: self.parts_bytes.get(k) or 0 for k in self.overlapping if k in self.parts_bytes}


@dataclass(frozen=True)
class Memory(Block):
    """Peaks of the measured steps (after warm-up) and the breakdown of the one the record explains."""

    total_bytes: int | None = spec(NUMBER)
    peak_allocated_bytes: int | None = spec(NUMBER)
    peak_reserved_bytes: int | None = spec(NUMBER)
    allocated_end_bytes: int | None = spec(NUMBER, omit_none=True)
    reserved_end_bytes: int | None = spec(NUMBER, omit_none=True)
    num_alloc_retries: int | None = spec(INT, omit_none=True)
    num_ooms: int | None = spec(INT, omit_none=True)
    sampled_peak_bytes: int | None = spec(NUMBER)
    sampled_baseline_bytes: int | None = spec(NUMBER)
    sampled_source: str | None = spec(STR)
    sampled_count: int | None = spec(INT)
    sampler_interval_s: float | None = spec(NUMBER)
    sampler_error: str | None = spec(STR, omit_none=True)
    breakdown: Breakdown | None = spec(Nested(Breakdown), omit_none=True)
    at_failure: dict | None = spec(OBJECT, omit_none=True)  # the tracker's counters when a run failed
    extra: dict = extra_keys()

    def to_dict(self) -> dict:
        if self.at_failure is not None and self.breakdown is None:  # a failed run: only what was known then
            return {"at_failure": self.at_failure, **self.extra}
        return super().to_dict()


@dataclass(frozen=True)
class Backends(Block):
    """The kernels that actually ran."""

    attention: str | None = spec(STR)
    attention_fallbacks: dict = spec(MapOf(STR), default={})
    kernel_backend: str | None = spec(STR)  # the engine's norm kernels (null: not the engine)
    norm_paths_by_layer: dict | None = spec(MapOf(STR))
    norm_path_counts: dict | None = spec(MapOf(INT))
    flash_tf32_rounding: bool | None = spec(BOOL, omit_none=True)
    extra: dict = extra_keys()


@dataclass(frozen=True)
class Loss(Block):
    final_mean_loss: float | None = spec(NUMBER)
    finite: bool | None = spec(BOOL)
    extra: dict = extra_keys()


@dataclass(frozen=True)
class CompileInfo(Block):
    """``compile``: what torch.compile did in a compiled run (absent for eager runs).

    Compile time is kept out of the step times: warm-up runs until a step compiles nothing, and the compile work of
    the warm-up is reported here; ``during_timing`` must be all zeros for the step times to exclude recompilation.
    """

    mode: str | None = spec(STR)  # torch.compile mode: default, max-autotune, reduce-overhead
    backend: str | None = spec(STR)  # inductor (aot_eager only in tests: MEMORY_TEST_COMPILE_BACKEND)
    regions: int | None = spec(INT)  # compiled regions (repeated blocks, regional compilation)
    compile_ms: float | None = spec(NUMBER)  # warm-up steps that compiled, minus an ordinary step each
    warmup_steps: int | None = spec(INT)  # warm-up steps run (at least config.warmup_iter)
    graphs: int | None = spec(INT)  # during warm-up: graphs compiled
    graph_breaks: int | None = spec(INT)
    recompiles: int | None = spec(INT)
    during_timing: dict | None = spec(OBJECT)  # graphs, graph_breaks, recompiles during the measured steps
    # DP modes: how the per-layer work after the backward ran: "compiled" (post-backward programs), "eager: <why>"
    # (programs fell back), "off"; absent for vanilla
    post_programs: str | None = spec(STR, omit_none=True)
    extra: dict = extra_keys()


@dataclass(frozen=True)
class Privacy(Block):
    """σ, C and ε at δ for the stated sampling (None/null for vanilla); never per-sample data."""

    noise_multiplier: float | None = spec(NUMBER)
    max_grad_norm: float | None = spec(NUMBER)
    noise_std: float | None = spec(NUMBER)
    delta: float | None = spec(NUMBER)
    dataset_size: int | None = spec(INT)
    batch_size: int | None = spec(INT)
    sample_rate: float | None = spec(NUMBER)
    epochs: float | None = spec(NUMBER)
    steps: int | None = spec(INT)
    accountant: str | None = spec(STR)
    privacy_unit: str | None = spec(STR)
    assumption: str | None = spec(STR)
    epsilon: float | None = spec(NUMBER)
    epsilon_infinite: bool | None = spec(BOOL, omit_none=True)
    epsilon_note: str | None = spec(STR, omit_none=True)
    # v2: the engine's clipping margins of the last measured step (null: upstream Opacus, or not reported)
    norm_error_margin: dict | None = spec(OBJECT)
    extra: dict = extra_keys()


@dataclass(frozen=True)
class SnapshotInfo(Block):
    requested_path: str | None = spec(STR)
    written: bool = spec(BOOL, default=False)
    reason: str | None = spec(STR, omit_none=True)
    extra: dict = extra_keys()


@dataclass(frozen=True)
class Probe(Block):
    """One probe of a max-batch search (a fresh process)."""

    batch_size: int = spec(POSITIVE_INT, required=True)
    status: str | None = spec(STR)
    exit_code: int | None = spec(INT)
    wall_s: float | None = spec(NUMBER)
    message: str | None = spec(STR)
    peak_allocated_bytes: int | None = spec(NUMBER)
    total_bytes: int | None = spec(NUMBER)
    median_ms: float | None = spec(NUMBER)
    samples_per_s: float | None = spec(NUMBER)
    extra: dict = extra_keys()


@dataclass(frozen=True)
class MaxBatchResult(Block):
    max_batch_size: int | None = spec(INT)
    first_oom_batch_size: int | None = spec(INT)
    limit_reached: bool | None = spec(BOOL, omit_none=True)
    probes: list = spec(ListOf(Nested(Probe)), default=[])
    extra: dict = extra_keys()


@dataclass(frozen=True)
class Distributed(Block):
    """A run over N > 1 processes: per-rank peaks and times (ok), or which ranks failed."""

    world_size: int | None = spec(INT)
    backend: str | None = spec(STR, omit_none=True)
    fsdp2_sharded: bool | None = spec(BOOL, omit_none=True)
    per_gpu_batch_size: int | None = spec(INT, omit_none=True)
    global_batch_size: int | None = spec(INT, omit_none=True)
    per_rank_peak_allocated_bytes: list | None = spec(ListOf(NUMBER, nullable=True), omit_none=True)
    per_rank_peak_bytes: list | None = spec(ListOf(NUMBER, nullable=True), omit_none=True)
    peak_bytes_max: float | None = spec(NUMBER, omit_none=True)
    peak_bytes_mean: float | None = spec(NUMBER, omit_none=True)
    peak_source: str | None = spec(STR, omit_none=True)
    per_rank_median_step_ms: list | None = spec(ListOf(NUMBER, nullable=True), omit_none=True)
    global_samples_per_s: float | None = spec(NUMBER, omit_none=True)
    per_rank_final_mean_loss: list | None = spec(ListOf(NUMBER, nullable=True), omit_none=True)
    failed_rank: int | None = spec(INT, omit_none=True)  # one rank's own failure record
    failed_ranks: list | None = spec(ListOf(INT), omit_none=True)
    extra: dict = extra_keys()


@dataclass(frozen=True)
class Env(Block):
    """Where a record was measured (profiling.environment)."""

    device_type: str | None = spec(STR)
    gpu_name: str | None = spec(STR)
    gpu_count: int | None = spec(INT)
    gpu_total_memory_bytes: int | None = spec(NUMBER)
    gpu_capability: str | None = spec(STR)
    cuda_runtime: str | None = spec(STR)
    cudnn: int | None = spec(INT)
    cpu: str | None = spec(STR)
    cpu_count: int | None = spec(INT)
    python: str | None = spec(STR)
    platform: str | None = spec(STR)
    versions: dict = spec(OBJECT, default={})
    git: dict = spec(OBJECT, default={})
    host: str | None = spec(STR)
    utc_time: str | None = spec(STR)
    cuda_visible_devices: str | None = spec(STR)
    command: str | None = spec(STR)
    driver_version: str | None = spec(STR, omit_none=True)
    cuda_driver_version: str | None = spec(STR, omit_none=True)
    nvml_error: str | None = spec(STR, omit_none=True)
    fault_injection: dict | None = spec(OBJECT, omit_none=True)  # tests only: MEMORY_TEST_INJECT_OOM_ABOVE_BATCH
    extra: dict = extra_keys()

    @property
    def device_label(self) -> str:
        """Short name of the hardware (records with different labels never share a chart)."""
        return (self.gpu_name or "unknown GPU") if self.device_type == "cuda" else "CPU"


@dataclass(frozen=True)
class Record(Block):
    """One configuration's result: a measured run, or a max-batch search (``record_type``)."""

    schema: str = spec(STR, required=True)
    schema_version: int = spec(INT, required=True)
    record_type: str = spec(STR, required=True)
    experiment: str = spec(STR, required=True)
    status: str = spec(STR, required=True)
    message: str | None = spec(STR)
    exit_code: int | None = spec(INT)
    traceback_tail: list | None = spec(ListOf(STR), omit_none=True)
    config: RunConfig = spec(Nested(RunConfig), required=True)
    model: ModelFacts | None = spec(Nested(ModelFacts))
    peak_memory_mb: float | None = spec(NUMBER)  # legacy: memory.total_bytes in MiB
    avg_time_ms: float | None = spec(NUMBER)  # legacy: timing.mean_ms
    timing: Timing | None = spec(Nested(Timing))
    memory: Memory | None = spec(Nested(Memory))
    backends: Backends | None = spec(Nested(Backends))
    loss: Loss | None = spec(Nested(Loss), omit_none=True)
    privacy: Privacy | None = spec(Nested(Privacy))
    experiment_notes: dict | None = spec(OBJECT)
    memory_snapshot: SnapshotInfo | None = spec(Nested(SnapshotInfo), omit_none=True)
    compile: CompileInfo | None = spec(Nested(CompileInfo), omit_none=True)
    max_batch: MaxBatchResult | None = spec(Nested(MaxBatchResult), omit_none=True)
    distributed: Distributed | None = spec(Nested(Distributed), omit_none=True)
    env: Env = spec(Nested(Env), required=True)
    duration_s: float | None = spec(NUMBER, omit_none=True)
    recorded_by: str | None = spec(STR, omit_none=True)  # "sweep" for records the sweep wrote without a run
    extra: dict = extra_keys()
    path: str | None = field(default=None, compare=False)  # the file it was read from (not a JSON key)

    @classmethod
    def _upgraded(cls, values: dict, extra: dict, data: dict):
        rec = cls(**values, extra=extra)
        if rec.schema_version == 1:
            rec = _from_v1(rec)
        return rec

    @property
    def device(self) -> str:
        """Hardware label, plus " x<N> FSDP2" for a run over N processes (never mixed with single-GPU runs)."""
        world = self.config.world_size
        return self.env.device_label + (f" x{world} FSDP2" if world > 1 else "")


def _from_v1(rec: Record) -> Record:
    """What version 1 lacked, derived: the engine's caches overlap the remainder (they always did); early records'
    privacy block lacks the batch its ε is for (the global batch)."""
    memory, privacy = rec.memory, rec.privacy
    if memory is not None and memory.breakdown is not None and rec.config.experiment_family == "engine":
        memory = memory.replace(breakdown=memory.breakdown.replace(overlapping=["dp_state"]))
    if privacy is not None and privacy.batch_size is None:
        privacy = privacy.replace(batch_size=rec.config.global_batch_size)
    return rec.replace(memory=memory, privacy=privacy)
