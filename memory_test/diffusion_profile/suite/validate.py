"""single_experiment's flags -> the run's typed config (``RunConfig``), its torch device, and notices.

Each value is first checked against its own flag's rule (``flags.check_values``); then, one small check each, the
rules that involve several flags: the experiment and K, processes and devices, the model and image size, the
output paths. Bad input raises ``UsageError`` (one line, exit 2, nothing written).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from memory_test.cli_common.devices import resolve_device
from memory_test.cli_common.errors import ToolError
from memory_test.diffusion_profile.suite import distributed_rules as rules
from memory_test.diffusion_profile.suite.flags import FLAGS, TOOL, check_values
from memory_test.models.dit_presets import build_dit_config, resolve_model_name
from memory_test.records.io import check_writable_output
from memory_test.records.record import MaxBatchSearch, RunConfig

SYNTHETIC_DATA = "synthetic: fixed seeded N(0,1) latents and uniform labels; t and noise drawn every step"
CLASS_DROPOUT_PROB = 0.1
MAX_BATCH_LIMIT = {"cuda": 65536, "cpu": 64}


class UsageError(ToolError):
    """Bad input to single_experiment: exit 2, no record; without a fix of its own it points at --help."""

    def __init__(self, what: str, fix: str | None = None):
        super().__init__(what, fix or f"see `{TOOL} --help`")


def validate(args: argparse.Namespace) -> tuple[RunConfig, object, list[str]]:
    """The effective config of the run, the torch device, and notices; UsageError for any bad input."""
    from memory_test.diffusion_profile.suite.experiments import resolve_experiment

    problems = check_values(args)
    if problems:
        raise UsageError(problems[0])
    bracket = parse_bracket(args.max_batch_bracket)
    check_search_start(args)
    delta = args.delta if args.delta is not None else 1.0 / args.dataset_size
    check_batch_fits_dataset(args)
    exp = resolve_experiment(args.experiment)
    check_noise_multiplicity(exp, args.noise_multiplicity)
    check_compile(exp, args.compile, args.nproc_per_node)
    requested, device = run_devices(args, exp)
    model, notice = model_for_run(args.model, args.patch_size, device)
    dit = dit_config(model, args)
    check_outputs(args)
    config = build_config(args, exp, model, dit, requested, device, delta, bracket)
    return config, device, notices(args, exp, requested, notice)


def check_batch_fits_dataset(args: argparse.Namespace) -> None:
    if args.batch_size > args.dataset_size and not args.find_max_batch:
        raise UsageError(f"--batch-size {args.batch_size} exceeds --dataset-size {args.dataset_size}")


def check_noise_multiplicity(exp, k: int) -> None:
    if k > 1 and not exp.supports_noise_multiplicity:
        raise UsageError(
            f"--experiment {exp.name} is unmodified upstream Opacus, which treats every row as a sample and cannot "
            f"group the K={k} noise draws of one image into one privacy unit",
            "use --noise-multiplicity 1, or an engine mode (e.g. ghost, bookkeeping) which supports K > 1",
        )


def check_compile(exp, mode: str, nproc: int) -> None:
    """What can run under torch.compile: vanilla and the engine's single-process modes (``dp_model.compile``)."""
    if mode == "off":
        return
    if exp.family == "upstream_opacus":
        raise UsageError(
            f"--experiment {exp.name} is unmodified upstream Opacus, whose per-sample hooks do not run under "
            "torch.compile",
            "use --compile off, or an engine mode (e.g. flash_clip_bk)",
        )
    if nproc > 1:
        raise UsageError("--compile with --nproc-per-node > 1: FSDP2 runs are eager", "use --compile off")
    if mode == "reduce-overhead" and exp.private:
        raise UsageError(
            f"--compile reduce-overhead with {exp.name}: CUDA graphs are not yet verified exact for the DP modes "
            "(the recorded layer inputs and output gradients would live in the graphs' memory pool)",
            "use --compile default or max-autotune for DP modes (reduce-overhead works for vanilla)",
        )


def run_devices(args: argparse.Namespace, exp) -> tuple[object, object]:
    """(the device asked for, the device this process runs on: cuda:LOCAL_RANK inside a torchrun worker)."""
    try:
        rules.check_request(exp, args.nproc_per_node)
        requested = resolve_device(args.device)
        rules.check_device(requested, args.device, args.nproc_per_node)
    except ToolError as e:
        raise UsageError(e.what, e.fix) from None
    return requested, rules.worker_device(requested) if rules.is_worker() else requested


def model_for_run(requested: str | None, patch_size: int | None, device) -> tuple[str, str | None]:
    """Effective model name (--patch-size picks the family's /p variant); plus a notice if defaulted."""
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


def dit_config(model: str, args: argparse.Namespace) -> dict:
    try:
        dit = build_dit_config(model, args.image_size, None, args.in_channels, args.num_classes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.image_size is not None and dit["sample_size"] * 8 != args.image_size:  # build_dit_config accepted it
        raise UsageError(f"--image-size {args.image_size} is not a multiple of 8*patch_size")
    return dit


def check_outputs(args: argparse.Namespace) -> None:
    for flag, path in (("--output", args.output), ("--memory-snapshot", args.memory_snapshot)):
        if path is not None and (why := check_writable_output(path)):
            raise UsageError(why.replace("--output", flag))
    if args.memory_snapshot and Path(args.memory_snapshot).resolve() == Path(args.output).resolve():
        raise UsageError("--memory-snapshot is the --output file: one would overwrite the other",
                         "give the snapshot its own file, e.g. snapshot.pickle")  # fmt: skip


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


def check_search_start(args: argparse.Namespace) -> None:
    """A bracketed search only bisects: a start given with it would go unused."""
    if args.max_batch_start is not None and args.max_batch_bracket is not None:
        raise UsageError(
            "--max-batch-start with --max-batch-bracket: a bracketed search bisects between OK and OOM and never "
            "doubles from a start",
            "leave out --max-batch-start, or --max-batch-bracket to double from the start",
        )


def build_config(args, exp, model: str, dit: dict, requested, device, delta: float, bracket) -> RunConfig:
    """The typed config: every ``copy`` flag as given, the resolved values, and what follows from them."""
    copied = {f.field: getattr(args, f.dest) for f in FLAGS if f.copy}
    nproc, batch = args.nproc_per_node, args.batch_size
    return RunConfig(
        **copied,
        experiment=exp.name,
        experiment_requested=args.experiment,
        experiment_family=exp.family,
        # What the engine mode is made of (None for vanilla and upstream baselines): lets charts pair a sharded mode
        # with its single-process equivalent without importing the engine.
        mode=None if exp.mode is None else {"norm": exp.mode.norm, "strategy": exp.mode.strategy,
                                            "sharding": exp.mode.sharding},
        private=exp.private,
        model=model,
        image_size=dit["sample_size"] * 8,
        patch_size=dit["patch_size"],
        in_channels=dit["in_channels"],
        num_classes=dit["num_embeds_ada_norm"],
        latent_shape=[dit["in_channels"], dit["sample_size"], dit["sample_size"]],
        rows_per_step=batch * args.noise_multiplicity,
        tf32_matmul=device.type == "cuda",
        autocast_dtype="bfloat16" if args.precision == "bf16" else None,
        device=str(requested),
        delta=delta,
        poisson_sampling=False,
        data=SYNTHETIC_DATA,
        class_dropout_prob=CLASS_DROPOUT_PROB,
        world_size=nproc,
        global_batch_size=batch * nproc,
        fsdp2=nproc > 1,
        output=str(args.output),
        find_max_batch=search_settings(args, device, bracket) if args.find_max_batch else None,
    )  # fmt: skip


def search_settings(args: argparse.Namespace, device, bracket: tuple[int, int] | None) -> MaxBatchSearch:
    """How --find-max-batch will search (recorded as ``config.find_max_batch``)."""
    search = MaxBatchSearch(
        method="doubling from start, then bisection between the last ok and the first oom batch",
        start=args.max_batch_start or args.batch_size,
        limit=args.max_batch_limit or MAX_BATCH_LIMIT[device.type],
        resolution=args.max_batch_resolution,
        probe_num_iter=args.probe_num_iter,
        probe_warmup_iter=args.probe_warmup_iter,
        probe_timeout_s=args.probe_timeout,
        note=None if device.type == "cuda" else "on CPU nothing raises out-of-memory: the search stops at the limit",
    )
    if bracket is None:
        return search
    return search.replace(
        method="bisection between a batch known to run and one known to run out of memory",
        start=None,  # no doubling
        bracket={"ok_batch_size": bracket[0], "oom_batch_size": bracket[1], "source": "--max-batch-bracket"},
    )


def notices(args: argparse.Namespace, exp, requested, model_notice: str | None) -> list[str]:
    out = [model_notice] if model_notice else []
    if exp.private and args.noise_multiplier == 0:
        out.append("--noise-multiplier 0 adds no noise: this configuration is not private (ε = ∞, null in JSON)")
    if args.nproc_per_node > 1 and requested.type == "cpu" and args.device == "auto" and not rules.is_worker():
        out.append(f"no GPU: {args.nproc_per_node} CPU processes with gloo (pass --device cuda to require GPUs)")
    return out
