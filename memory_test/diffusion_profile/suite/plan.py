"""The sweep's plan: its flags, every configuration validated by single_experiment's own checks, record names.

``run_all_experiments.sh`` asks for the plan once (``python -m memory_test.diffusion_profile.suite.plan
--emit-bash ARGS...``) and gets bash assignments: one entry per configuration with its label, record path and the
complete single_experiment command line (``flags.to_argv`` of its validated config), plus the lines to print.
Bad input ends here, before anything runs: one line ``run_all_experiments.sh: error: <what> — <what to do>``, exit 2.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from memory_test.cli_common.errors import ToolArgumentParser, ToolError, run_tool
from memory_test.cli_common.files import output_path_problem
from memory_test.diffusion_profile.suite import flags as F
from memory_test.diffusion_profile.suite.resume import BATCH_PART
from memory_test.records.record import RunConfig

TOOL = "run_all_experiments.sh"
REPO_ROOT = Path(__file__).resolve().parents[3]
GPU_BATCH_SIZES, CPU_BATCH_SIZES = (8, 32, 64), (2, 4)
# On CPU a DiT-tiny step costs milliseconds and a configuration's time is its process start: enough steps for a
# median that does not swing with one slow step. The sweep still shows that the pipeline works, not GPU numbers.
CPU_STEPS = {"--num-iter": 10, "--warmup-iter": 2}
CPU_NOTE = (
    "CPU step times of DiT-tiny are dominated by Python overhead and by whatever else the machine runs: ratios "
    "between modes are not meaningful here and say nothing about a GPU (the summary marks spread-out timings)."
)
EPILOG = """Defaults: without a GPU, DiT-tiny on CPU with --batch-sizes 2,4 --num-iter 10 --warmup-iter 2; on a GPU,
DiT-XL/2 with --batch-sizes 8,32,64 and single_experiment.py's --num-iter 10 --warmup-iter 3. With
--nproc-per-node N > 1 the default experiments are the sharded DP modes and the vanilla FSDP2 baseline.

Each record is named <experiment>__<model>__img<size>__bs<B>__<precision>__k<K>__<fa|nofa>[__w<N>].json
(bsmax for a max-batch search; __w<N> only when N > 1). Larger batches of an experiment that ran out of memory
are recorded as "skipped". Rerunning the same command resumes: finished records (ok, oom, skipped) are kept, error
records are retried; a finished record measured under other flags (--optimizer, --num-iter, σ, ...) is refused
before anything runs. One sweep per --output-dir at a time. With --compile and no --experiments, the experiments
that cannot run compiled are left out (a note names each).

Every flag is checked before anything runs (each configuration by single_experiment.py's own checks); bad input
ends with one line "run_all_experiments.sh: error: <what> — <what to do>" and exit code 2. Exit codes: 0 every
configuration ran (ok, oom or skipped), 1 some ended in error, 2 bad input or folder in use, 130 interrupted.
MEMORY_TEST_DEBUG=1 shows tracebacks."""


def build_sweep_parser() -> argparse.ArgumentParser:
    p = ToolArgumentParser(
        prog=TOOL,
        description="Runs every (experiment x batch size x precision) configuration with single_experiment.py, "
        "each in a fresh process, writing one JSON record per configuration into --output-dir; then draws the "
        "charts and prints summary.md.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    own = p.add_argument_group("the sweep")
    own.add_argument(
        "--output-dir",
        default=str(REPO_ROOT / "results" / "diffusion_profile"),
        help="records, charts and summary.md (default: results/diffusion_profile)",
    )
    own.add_argument(
        "--find-max-batch", action="store_true", help="also search the largest batch of each experiment and precision"
    )
    own.add_argument("--max-batch-only", action="store_true", help="only the max-batch searches, no batch grid")
    own.add_argument(
        "--no-max-batch-bracket",
        dest="max_batch_bracket",
        action="store_false",
        help="always double from the start; by default a search whose grid records hold a batch that "
        "ran and a larger one that ran out of memory only bisects between the two",
    )
    own.add_argument("--no-plots", dest="plots", action="store_false", help="skip the visualizer at the end")
    own.add_argument("--dry-run", action="store_true", help="list the configurations and what would run, then stop")
    own.add_argument("--emit-bash", action="store_true", help=argparse.SUPPRESS)
    F.add_sweep_flags(p)
    return p  # fmt: skip


@dataclass(frozen=True)
class Configuration:
    config: RunConfig
    label: str
    batch: str  # a batch size, or "max" for a max-batch search
    key: tuple[str, str]  # (experiment, precision): grid records of one key bracket its search
    output: Path
    argv: list[str]  # single_experiment's complete command line


@dataclass(frozen=True)
class Plan:
    configurations: list[Configuration]
    info: list[str]  # lines the sweep prints before it starts
    output_dir: Path


def on_gpu(device: str | None) -> bool:
    """Whether this sweep runs on a GPU: one is visible (torch decides; without nvidia-smi there is none) and
    --device does not say cpu."""
    if device == "cpu" or shutil.which("nvidia-smi") is None:
        return False
    import torch

    return torch.cuda.is_available()


def make_plan(args: argparse.Namespace) -> Plan:
    out_dir = output_folder(args.output_dir)
    refuse_start_with_bracketing(args)
    gpu = on_gpu(args.device)
    batches = sorted(set(F.split_list(F.BY_NAME["--batch-size"], args.batch_size, int)))
    batches = batches or list(GPU_BATCH_SIZES if gpu else CPU_BATCH_SIZES)
    precisions = list(dict.fromkeys(F.split_list(F.BY_NAME["--precision"], args.precision))) or ["fp32"]
    common = passed_on(args, gpu)
    names, info = experiments(args)
    grid = [] if args.max_batch_only else batches
    configs = []
    for name in names:
        for precision in precisions:
            configs += [configuration(name, precision, str(b), common, out_dir) for b in grid]
            if args.find_max_batch or args.max_batch_only:
                configs.append(configuration(name, precision, "max", common, out_dir))
    if not configs:
        raise ToolError("the options select no configuration to run", "check --experiments, --batch-sizes")
    for c in configs:
        refuse_kept_record_of_other_settings(c)
    return Plan(configs, header(configs, args, gpu, batches, precisions, info), out_dir)


def output_folder(text: str) -> Path:
    """--output-dir as a folder records can be written into (nothing is created here)."""
    if not text.strip():  # Path("") is the current folder: records would land wherever the sweep was started
        raise ToolError("--output-dir is empty", "give the folder for the records, e.g. results/diffusion_profile")
    out_dir = Path(text)
    if out_dir.exists() and not out_dir.is_dir():
        raise ToolError(f"--output-dir {out_dir} is a file, not a folder", "choose a folder")
    why = output_path_problem(out_dir / "record.json")
    if why:
        raise ToolError(f"--output-dir {out_dir}: {why}", "choose a folder you can write")
    return out_dir


def refuse_start_with_bracketing(args: argparse.Namespace) -> None:
    """The sweep brackets a search by its grid records unless told not to: a --max-batch-start would then go unused
    (single_experiment refuses a start with a bracket; the sweep adds the bracket only when it runs the search)."""
    searching = args.find_max_batch or args.max_batch_only
    if searching and args.max_batch_start is not None and args.max_batch_bracket:
        raise ToolError(
            "--max-batch-start with the sweep's bracketing (on by default): a search whose grid records hold a batch "
            "that ran and a larger one that ran out of memory bisects between them and never uses the start",
            "add --no-max-batch-bracket to always double from --max-batch-start, or leave --max-batch-start out",
        )


def passed_on(args: argparse.Namespace, gpu: bool) -> list[str]:
    """The single_experiment flags given to the sweep, and the sweep's CPU step counts where none were given."""
    argv: list[str] = []
    for flag in F.FLAGS:
        value = getattr(args, flag.dest, None) if flag.sweep == "pass" else None
        if value is None and not gpu and flag.name in CPU_STEPS:
            value = CPU_STEPS[flag.name]
        if value is None or (value is False and flag.negative is None):
            continue
        if flag.type is None:
            argv.append(flag.name if value else flag.negative)
        else:
            argv += [flag.name, repr(value) if isinstance(value, float) else str(value)]
    return argv


def experiments(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The experiments to run (canonical names) and the notes about the ones left out."""
    from memory_test.diffusion_profile.suite.distributed_rules import FSDP_BASELINES
    from memory_test.diffusion_profile.suite.experiments import (
        EXPERIMENTS,
        resolve_experiment,
        sharded_experiments,
        single_device_experiments,
    )

    nproc, k = args.nproc_per_node or 1, args.noise_multiplicity or 1
    if args.experiment is not None:
        given = F.split_list(F.BY_NAME["--experiment"], args.experiment)
        try:
            names = [resolve_experiment(e).name for e in given]
        except ValueError as e:
            raise ToolError(str(e), "see run_all_experiments.sh --help") from None
    else:
        names = [*FSDP_BASELINES, *sharded_experiments()] if nproc > 1 else single_device_experiments()
    names = list(dict.fromkeys(names))
    no_k = [n for n in names if k > 1 and not EXPERIMENTS[n].supports_noise_multiplicity]
    if no_k and args.experiment is not None:
        raise ToolError(f"{', '.join(no_k)} (upstream Opacus) cannot group K > 1 noise draws per image",
                        "leave them out of --experiments, or use --noise-multiplicity 1")  # fmt: skip
    notes = (
        [f"note: K > 1: leaving out {', '.join(no_k)} (upstream Opacus treats every row as a sample)"] if no_k else []
    )
    names = [n for n in names if n not in no_k]
    if args.experiment is None:  # named experiments are checked (and refused) one by one in `validated`
        names, left_out = compilable(names, args.compile or "off", nproc)
        notes += left_out
    return names, notes


def compilable(names: list[str], mode: str, nproc: int) -> tuple[list[str], list[str]]:
    """The default experiments that run under --compile ``mode`` (single_experiment's own check), and a note for
    each left out; all of them when none would (then the first configuration's check says why)."""
    from memory_test.diffusion_profile.suite.experiments import EXPERIMENTS
    from memory_test.diffusion_profile.suite.validate import check_compile

    refused = {}
    for name in names:
        try:
            check_compile(EXPERIMENTS[name], mode, nproc)
        except ToolError as e:
            refused[name] = e.what
    if len(refused) == len(names):
        return names, []
    return [n for n in names if n not in refused], [f"note: leaving out {n}: {why}" for n, why in refused.items()]


def configuration(name: str, precision: str, batch: str, common: list[str], out_dir: Path) -> Configuration:
    """One configuration, validated by single_experiment's own parser and checks (nothing is written)."""
    config = validated(name, precision, batch, common, out_dir)
    output = out_dir / record_name(config, batch)
    argv = F.to_argv(config.replace(output=str(output)))
    label = f"{name} {precision} " + ("find-max-batch" if batch == "max" else f"bs={batch}")
    return Configuration(config, label, batch, (name, precision), output, argv)


def validated(name: str, precision: str, batch: str, common: list[str], out_dir: Path) -> RunConfig:
    from memory_test.diffusion_profile.suite.validate import validate

    argv = ["--experiment", name, "--precision", precision, "--output", str(out_dir / "sweep_flag_check.json")]
    argv += ["--find-max-batch", "--batch-size", "1"] if batch == "max" else ["--batch-size", batch]
    parser = F.build_parser("", exit_on_error=False)
    try:
        config, _, _ = validate(parser.parse_args(common + argv))
    except (ToolError, argparse.ArgumentError) as e:
        what, fix = (e.what, e.fix) if isinstance(e, ToolError) else (str(e), None)
        if fix is None or "--help" in fix:
            fix = "fix that flag (the sweep passes it to single_experiment.py)"
        raise ToolError(what, fix) from None
    return config


# The settings a record's name does not hold (it holds experiment, model, size, batch, precision, K, attention,
# processes, compile): a finished record kept on a rerun must have been measured with the same ones.
UNNAMED_SETTINGS = tuple(f for f in F.FLAGS if f.field and "." not in f.field and f.sweep == "pass")
# A max-batch search probes with the probe counts, never --num-iter/--warmup-iter (an ok search's record holds the
# probe counts in their place), and how it searched decides its answer. Not the probe timeout: a probe that runs out
# of time fails the search, and error records are rerun anyway.
SEARCH_SETTINGS = tuple(
    f
    for f in F.FLAGS
    if (f.field or "").startswith("find_max_batch.") and f.sweep == "pass" and f.name != "--probe-timeout"
)
MAX_BATCH_SETTINGS = (
    *(f for f in UNNAMED_SETTINGS if f.name not in ("--num-iter", "--warmup-iter")),
    *SEARCH_SETTINGS,
)


def refuse_kept_record_of_other_settings(c: Configuration) -> None:
    """A rerun keeps finished records by name: one measured under other flags (--optimizer, --num-iter, σ, a
    max-batch search's limit...) would be reported as this sweep's result. Refused before anything runs; error
    records are rerun anyway."""
    from memory_test.diffusion_profile.suite.resume import FINISHED
    from memory_test.records.io import load_record

    if not c.output.is_file():
        return
    rec, _ = load_record(c.output)
    if rec is None or rec.status not in FINISHED:
        return
    changed = changed_settings(rec.config, c.config)
    if changed:
        raise ToolError(
            f"{c.output} was measured with {', '.join(changed)}; a rerun keeps finished records, so it would be "
            "reported as this sweep's",
            "rerun with the flags it was measured with to resume, or choose another --output-dir",
        )


def changed_settings(kept: RunConfig, planned: RunConfig) -> list[str]:
    """Each setting the kept record was measured under otherwise, as "--flag <kept> (this sweep: <planned>)"; a
    setting the record does not hold is not compared (a search's start, when it bisected a bracket)."""
    settings = MAX_BATCH_SETTINGS if planned.find_max_batch is not None else UNNAMED_SETTINGS
    return [
        f"{flag.name} {old} (this sweep: {new})"
        for flag in settings
        if (old := F.field_value(kept, flag.field)) is not None and old != (new := F.field_value(planned, flag.field))
    ]


def record_name(config: RunConfig, batch: str) -> str:
    """``<experiment>__<model>__img<size>__bs<B|max>__<precision>__k<K>__<fa|nofa>[__w<N>][__c<compile>].json``."""
    parts = [
        config.experiment,
        re.sub(r"[^A-Za-z0-9.-]", "_", config.model.replace("/", "-")),
        f"img{config.image_size}",
        BATCH_PART.format(batch).strip("_"),
        config.precision,
        f"k{config.noise_multiplicity}",
        "fa" if config.use_flash_attention else "nofa",
    ]
    if config.world_size > 1:
        parts.append(f"w{config.world_size}")
    if config.compile != "off":
        parts.append(f"c{config.compile}")
    return "__".join(parts) + ".json"


def header(configs: list[Configuration], args, gpu: bool, batches: list[int], precisions, notes) -> list[str]:
    cfg = configs[0].config
    lines = list(notes)
    if not gpu and args.model is None:
        lines.append(f"No CUDA GPU: running the default sweep on CPU with the tiny model {cfg.model} "
                     "(CPU numbers are not GPU numbers).")  # fmt: skip
    if not gpu:
        lines.append(f"note: {CPU_NOTE}")
    names = ",".join(dict.fromkeys(c.key[0] for c in configs))
    fa = "fa" if cfg.use_flash_attention else "nofa"
    lines.append(f"Sweep: {len(configs)} configuration(s) | model {cfg.model} img {cfg.image_size} | device "
                 f"{cfg.device} | experiments {names}")  # fmt: skip
    lines.append(f"       batch sizes {' '.join(map(str, batches))} | precisions {','.join(precisions)} | "
                 f"K={cfg.noise_multiplicity} | {fa} | compile {cfg.compile} | processes {cfg.nproc_per_node} | "
                 f"records in {args.output_dir}")  # fmt: skip
    return lines


def emit_bash(plan: Plan, args: argparse.Namespace) -> str:
    """Bash assignments of the plan (every value quoted)."""
    q = shlex.quote
    configs = plan.configurations

    def array(name: str, values) -> str:
        return f"{name}=(" + " ".join(q(str(v)) for v in values) + ")"

    return "\n".join([
        f"OUT_DIR={q(str(plan.output_dir))}",
        f"PLOTS={int(args.plots)} DRY_RUN={int(args.dry_run)} USE_BRACKET={int(args.max_batch_bracket)}",
        f"TOTAL={len(configs)}",
        array("INFO", plan.info),
        array("C_LABEL", [c.label for c in configs]),
        array("C_BATCH", [c.batch for c in configs]),
        array("C_OUT", [c.output for c in configs]),
        array("C_ARGS", [" ".join(q(a) for a in c.argv) for c in configs]),
    ]) + "\n"  # fmt: skip


def _main(argv: list[str]) -> int:
    args = build_sweep_parser().parse_args(argv)
    try:
        plan = make_plan(args)
    except ValueError as e:  # a list flag's own message
        raise ToolError(str(e), "see run_all_experiments.sh --help") from None
    if args.emit_bash:
        sys.stdout.write(emit_bash(plan, args))
    else:
        print("\n".join(plan.info + [f"{c.label} -> {c.output}" for c in plan.configurations]))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(TOOL, lambda: _main(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
