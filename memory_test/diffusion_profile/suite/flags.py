"""single_experiment's flags, each defined once. Everything that knows a flag reads this table:

- ``build_parser``: single_experiment's command line;
- ``check_values``: each value's own rule (positive, finite, in range), before the cross-flag checks of ``validate``;
- ``to_argv``: the flags that reproduce a validated config (max-batch probes, the sweep's configurations);
- ``add_sweep_flags``: the sweep's command line (list flags such as ``--batch-sizes``, and every flag it passes on).

A flag's ``field`` is where its value lives in the run's config (``RunConfig``; "find_max_batch.limit" inside the
search block); ``copy`` flags go there unchanged, the others are resolved by ``validate`` (the model name, the
device, δ's default). Adding a flag that is recorded and swept: one ``Flag`` here (``copy=True``), one field of
``RunConfig``, and its use.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from memory_test.cli_common.errors import ToolArgumentParser
from memory_test.records.record import COMPILE_SETTINGS, RunConfig

TOOL = "single_experiment.py"
IMAGENET_TRAIN_SIZE = 1_281_167
PRECISIONS = ("fp32", "bf16")
OPTIMIZER_NAMES = ("adamw", "adam", "sgd")
COMPILE_MODES = COMPILE_SETTINGS  # the record refuses any other
ACCOUNTANTS = ("prv", "rdp")
RECORD_ONLY = ("skipped", "error")


@dataclass(frozen=True)
class Rule:
    """What one value must be, said in the singular and plural ("a positive integer", "positive integers")."""

    holds: Callable[[Any], bool]
    singular: str
    plural: str


POSITIVE_INT = Rule(lambda v: v > 0, "a positive integer", "positive integers")
NON_NEGATIVE_INT = Rule(lambda v: v >= 0, "an integer >= 0", "integers >= 0")
FINITE_POSITIVE = Rule(lambda v: math.isfinite(v) and v > 0, "a finite number > 0", "finite numbers > 0")
FINITE_NON_NEGATIVE = Rule(lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0", "finite numbers >= 0")
# numpy's and torch's seeders take [0, 2**32); the objective's generator is seeded with seed + 1
SEED = Rule(lambda v: 0 <= v < 2**31, "an integer in [0, 2**31)", "integers in [0, 2**31)")
OPEN_UNIT = Rule(lambda v: 0 < v < 1, "in (0, 1)", "in (0, 1)")


@dataclass(frozen=True)
class Flag:
    name: str
    group: str
    help: str = ""
    type: Callable | None = None  # None: a switch
    default: Any = None
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    rule: Rule | None = None
    required: bool = False
    negative: str | None = None  # the switch that sets it False ("--no-flash-attention")
    metavar: str | None = None
    field: str | None = None  # where the validated value lives in RunConfig (None: not part of the config)
    copy: bool = False  # the value goes into the config unchanged
    sweep: str = "pass"  # "pass": the sweep takes it and passes it on; "list": a comma list; "own": not the sweep's
    sweep_name: str | None = None  # the list flag's name in the sweep ("--batch-sizes")
    hidden: bool = False

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")

    def choice_list(self) -> Sequence[str] | None:
        return self.choices() if callable(self.choices) else self.choices


def _experiment_names() -> list[str]:
    from memory_test.diffusion_profile.suite.experiments import experiment_names

    return experiment_names()


def _sharded_names() -> str:
    from memory_test.diffusion_profile.suite.experiments import sharded_experiments

    return ", ".join(sharded_experiments())


FLAGS: tuple[Flag, ...] = (
    # experiment
    Flag("--experiment", "experiment", "training mode", str, required=True, choices=_experiment_names,
         field="experiment", sweep="list", sweep_name="--experiments"),
    Flag("--output", "experiment", "JSON record to write (atomically)", str, required=True, field="output",
         sweep="own"),
    Flag("--batch-size", "experiment", "samples per step (B); per GPU with --nproc-per-node", int, 4,
         rule=POSITIVE_INT, field="batch_size", copy=True, sweep="list", sweep_name="--batch-sizes"),
    Flag("--num-iter", "experiment", "measured steps", int, 10, rule=POSITIVE_INT, field="num_iter", copy=True),
    Flag("--warmup-iter", "experiment", "steps before the peak counters are reset", int, 3, rule=NON_NEGATIVE_INT,
         field="warmup_iter", copy=True),
    Flag("--noise-multiplicity", "experiment", "K noise draws per image: B*K rows per step", int, 1,
         rule=POSITIVE_INT, field="noise_multiplicity", copy=True),
    Flag("--seed", "experiment", "", int, 0, rule=SEED, field="seed", copy=True),
    # model
    Flag("--model", "model", "DiT size preset (DiT-tiny, DiT-S/2, DiT-B/2, DiT-L/2, DiT-XL/2) or e.g. DiT-B/4, "
         "facebook/DiT-XL-2-256 (default: DiT-XL/2 on a GPU, DiT-tiny on CPU)", str, field="model"),
    Flag("--image-size", "model", "image side in pixels (latents are 1/8); model default", int, rule=POSITIVE_INT,
         field="image_size"),
    Flag("--patch-size", "model", "patch size (default: the model's)", int, rule=POSITIVE_INT, field="patch_size"),
    Flag("--in-channels", "model", "latent channels (SD VAE: 4)", int, 4, field="in_channels"),
    Flag("--num-classes", "model", "class labels (default: the model's)", int, rule=POSITIVE_INT,
         field="num_classes"),
    Flag("--use-flash-attention", "model", "fused attention kernels (--no-flash-attention: SDPA math)", None, True,
         negative="--no-flash-attention", field="use_flash_attention", copy=True),
    # runtime
    Flag("--device", "runtime", "auto, cpu, cuda or cuda:N", str, "auto", field="device"),
    Flag("--precision", "runtime", "fp32 = TF32 matmuls; bf16 = autocast", str, "fp32", choices=PRECISIONS,
         field="precision", copy=True, sweep="list", sweep_name="--precisions"),
    Flag("--optimizer", "runtime", "", str, "adamw", choices=OPTIMIZER_NAMES, field="optimizer", copy=True),
    Flag("--compile", "runtime", "torch.compile the model's repeated blocks (DP modes: dp_model.compile); off: eager",
         str, "off", choices=COMPILE_MODES, field="compile", copy=True),
    Flag("--lr", "runtime", "", float, 1e-4, rule=FINITE_POSITIVE, field="lr", copy=True),
    Flag("--memory-snapshot", "runtime", "CUDA allocator snapshot (.pickle)", str, metavar="PATH",
         field="memory_snapshot", copy=True, sweep="own"),
    Flag("--nproc-per-node", "runtime", "processes (GPUs) under torchrun, started by this script: FSDP2 for the "
         "sharded DP modes and for vanilla; global batch = N x --batch-size", int, 1, rule=POSITIVE_INT,
         field="nproc_per_node", copy=True),
    # privacy
    Flag("--noise-multiplier", "privacy", "σ", float, 1.0, rule=FINITE_NON_NEGATIVE, field="noise_multiplier",
         copy=True),
    Flag("--max-grad-norm", "privacy", "per-sample clipping norm C", float, 1.0, rule=FINITE_POSITIVE,
         field="max_grad_norm", copy=True),
    Flag("--dataset-size", "privacy", "N for q = B/N (ImageNet-1k)", int, IMAGENET_TRAIN_SIZE, rule=POSITIVE_INT,
         field="dataset_size", copy=True),
    Flag("--delta", "privacy", "δ of the reported ε (default 1/N)", float, rule=OPEN_UNIT, field="delta"),
    Flag("--epochs", "privacy", "epochs the reported ε covers: steps = ceil(E*N/B)", float, 1.0,
         rule=FINITE_POSITIVE, field="epochs", copy=True),
    Flag("--accountant", "privacy", "", str, "prv", choices=ACCOUNTANTS, field="accountant", copy=True),
    # max batch search
    Flag("--find-max-batch", "max batch search", "largest batch that fits (doubling, then bisection)",
         field="find_max_batch", sweep="own"),
    Flag("--max-batch-start", "max batch search", "first probe (default: --batch-size); not with "
         "--max-batch-bracket, which only bisects", int, rule=POSITIVE_INT,
         field="find_max_batch.start"),
    Flag("--max-batch-limit", "max batch search", "stop there (default 65536 GPU, 64 CPU)", int, rule=POSITIVE_INT,
         field="find_max_batch.limit"),
    Flag("--max-batch-resolution", "max batch search", "stop bisecting at this gap", int, 1, rule=POSITIVE_INT,
         field="find_max_batch.resolution"),
    Flag("--max-batch-bracket", "max batch search", "batches already measured under this configuration (one ran, "
         "one ran out of memory): skip the doubling and bisect between them; recorded in the result", str,
         metavar="OK,OOM", field="find_max_batch.bracket", sweep="own"),
    Flag("--probe-num-iter", "max batch search", "", int, 2, rule=POSITIVE_INT, field="find_max_batch.probe_num_iter"),
    Flag("--probe-warmup-iter", "max batch search", "", int, 1, rule=NON_NEGATIVE_INT,
         field="find_max_batch.probe_warmup_iter"),
    Flag("--probe-timeout", "max batch search", "seconds per probe", float, 900.0, rule=FINITE_POSITIVE,
         field="find_max_batch.probe_timeout_s"),
    # the sweep's own: a "skipped" or "error" record for a configuration it did not run
    Flag("--record-only", "internal", "", str, choices=RECORD_ONLY, sweep="own", hidden=True),
    Flag("--record-message", "internal", "", str, sweep="own", hidden=True),
)  # fmt: skip
BY_NAME = {f.name: f for f in FLAGS}
BY_DEST = {f.dest: f for f in FLAGS}


def build_parser(description: str, exit_on_error: bool = True) -> argparse.ArgumentParser:
    """single_experiment's parser. ``exit_on_error=False`` raises ToolError instead of exiting (the sweep checks
    the values it will pass on with this parser before anything runs)."""
    parser = ToolArgumentParser(
        prog=TOOL,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        exit_on_error=exit_on_error,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in FLAGS:
        group = groups.setdefault(flag.group, parser.add_argument_group(flag.group))
        _add(group, flag, flag.name, flag.default)
    return parser


def _add(parser, flag: Flag, name: str, default: Any) -> None:
    help_text = argparse.SUPPRESS if flag.hidden else flag.help
    if flag.type is None and flag.negative is None:
        parser.add_argument(name, dest=flag.dest, action="store_true", default=default or False, help=help_text)
    elif flag.type is None:  # a switch pair
        pair = parser.add_mutually_exclusive_group()
        pair.add_argument(name, dest=flag.dest, action="store_true", default=default, help=help_text)
        pair.add_argument(flag.negative, dest=flag.dest, action="store_false", help=f"the opposite of {name}")
    else:
        parser.add_argument(
            name,
            dest=flag.dest,
            type=flag.type,
            default=default,
            required=flag.required and default is None and name == flag.name,
            choices=flag.choice_list(),
            metavar=flag.metavar,
            help=help_text,
        )


def rule_problem(flag: Flag, value: Any) -> str | None:
    """Why ``value`` breaks the flag's own rule ("--batch-size must be a positive integer, got 0"), or None."""
    if value is None or flag.rule is None or flag.rule.holds(value):
        return None
    return f"{flag.name} must be {flag.rule.singular}, got {value}"


def check_values(args: argparse.Namespace) -> list[str]:
    """Every value against its flag's rule (None: not given)."""
    return [why for flag in FLAGS if (why := rule_problem(flag, getattr(args, flag.dest, None)))]


def field_value(config: RunConfig, path: str) -> Any:
    """The value at a flag's ``field`` ("find_max_batch.limit": inside the search block); None where there is none."""
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _format(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def to_argv(config: RunConfig, skip: Sequence[str] = ()) -> list[str]:
    """single_experiment flags that reproduce ``config``, leaving out the flags named in ``skip`` (and the search's
    bracket, which a caller adds when it has one; a start that is the default one, which a bracket would refuse)."""
    argv: list[str] = []
    for flag in FLAGS:
        if flag.field is None or flag.name in skip or flag.name == "--max-batch-bracket":
            continue
        value = field_value(config, flag.field)
        if flag.name == "--max-batch-start" and value == config.batch_size:
            continue
        if flag.type is None and flag.negative is None:
            argv += [flag.name] if value else []
        elif flag.type is None:
            argv.append(flag.name if value else flag.negative)
        elif value is not None:
            argv += [flag.name, _format(value)]
    return argv


# ----- the sweep's command line ---------------------------------------------------------------------------------


def add_sweep_flags(parser: argparse.ArgumentParser) -> None:
    """single_experiment's flags as the sweep takes them: each list flag under its plural name (the singular kept
    as an alias), every "pass" flag unchanged but without a default (given ones are passed on, the rest are
    single_experiment's or the sweep's device defaults)."""
    group = parser.add_argument_group("single_experiment.py flags (passed on to every configuration)")
    for flag in FLAGS:
        if flag.sweep == "list":
            group.add_argument(flag.sweep_name, flag.name, dest=flag.dest, default=None, metavar="A,B,...",
                               help=f"{flag.help} (a comma list)")  # fmt: skip
        elif flag.sweep == "pass":
            _add(group, flag, flag.name, flag.default if flag.type is None and flag.negative else None)


def split_list(flag: Flag, text: str | None, convert: Callable = str) -> list:
    """A list flag's comma list: its values, each checked against the flag's rule; ValueError with the message."""
    if text is None:
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{flag.sweep_name} {text!r} names no {flag.dest.replace('_', ' ')}")
    values = []
    for item in items:
        try:
            value = convert(item)
        except ValueError:
            raise ValueError(f"{flag.sweep_name} must be {flag.rule.plural}, got {item!r}") from None
        if flag.rule is not None and not flag.rule.holds(value):
            raise ValueError(f"{flag.sweep_name} must be {flag.rule.plural}, got {item!r}")
        choices = flag.choice_list()
        if choices is not None and flag.dest != "experiment" and value not in choices:  # experiments: aliases too
            raise ValueError(f"{flag.sweep_name} takes {', '.join(choices)}, got {item!r}")
        values.append(value)
    return values
