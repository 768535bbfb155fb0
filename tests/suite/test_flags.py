"""Every flag is defined once (suite/flags.py): the parser, the value checks, the argv that reproduces a config and
the sweep's flags all come from that table; the sweep's plan is single_experiment's own validation."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from memory_test.cli_common.errors import ToolError
from memory_test.diffusion_profile.suite import flags as F
from memory_test.diffusion_profile.suite import plan, resume
from memory_test.diffusion_profile.suite.validate import validate
from memory_test.records.record import MaxBatchSearch, RunConfig
from tests.conftest import FIXTURE_RECORDS

CPU = ["--model", "DiT-tiny", "--device", "cpu"]


def _config(argv: list[str]) -> RunConfig:
    return validate(F.build_parser("").parse_args(argv))[0]


def test_every_flag_with_a_field_names_a_field_of_the_config():
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    search = {f.name for f in dataclasses.fields(MaxBatchSearch)}
    for flag in F.FLAGS:
        if flag.field is None:
            continue
        head, _, rest = flag.field.partition(".")
        assert head in fields, flag.name
        assert not rest or (head == "find_max_batch" and rest in search), flag.name


@pytest.mark.parametrize(
    "extra",
    [
        ["--batch-size", "3", "--noise-multiplicity", "2", "--precision", "bf16", "--no-flash-attention"],
        ["--experiment", "flash_bk", "--lr", "3e-05", "--delta", "1e-07", "--epochs", "2.5", "--accountant", "rdp"],
        ["--find-max-batch", "--max-batch-limit", "32", "--max-batch-resolution", "4", "--probe-num-iter", "3"],
    ],
)
def test_a_config_reproduces_itself_through_its_argv(tmp_path, extra):
    argv = ["--experiment", "ghost", "--output", str(tmp_path / "r.json"), *CPU, *extra]
    argv = argv[2:] if extra[0] == "--experiment" else argv
    config = _config(argv)
    again = _config(F.to_argv(config))
    assert dataclasses.replace(again, experiment_requested=config.experiment_requested) == config


def test_value_rules_come_from_the_table(tmp_path):
    base = ["--experiment", "vanilla", "--output", str(tmp_path / "r.json"), *CPU]
    for flag, value, message in (
        ("--batch-size", "0", "--batch-size must be a positive integer, got 0"),
        ("--warmup-iter", "-1", "--warmup-iter must be an integer >= 0, got -1"),
        ("--noise-multiplier", "nan", "--noise-multiplier must be a finite number >= 0, got nan"),
        ("--delta", "1.5", "--delta must be in (0, 1), got 1.5"),
    ):
        with pytest.raises(ToolError, match=message.replace("(", r"\(").replace(")", r"\)")):
            _config([*base, flag, value])


def test_the_sweep_takes_every_flag_it_passes_on_and_its_lists():
    parser = plan.build_sweep_parser()
    options = {o for a in parser._actions for o in a.option_strings}
    for flag in F.FLAGS:
        if flag.sweep == "pass":
            assert flag.name in options, flag.name
        if flag.sweep == "list":
            assert {flag.name, flag.sweep_name} <= options, flag.name
    assert {"--output-dir", "--find-max-batch", "--max-batch-only", "--dry-run", "--no-plots"} <= options


def test_the_plan_validates_every_configuration_and_emits_bash(tmp_path):
    args = plan.build_sweep_parser().parse_args(
        ["--experiments", "vanilla,ghost_bk", "--batch-sizes", "4,2", "--output-dir", str(tmp_path), "--device", "cpu",
         "--find-max-batch", "--num-iter", "2"]
    )  # fmt: skip
    p = plan.make_plan(args)
    assert [c.label for c in p.configurations] == [
        "vanilla fp32 bs=2", "vanilla fp32 bs=4", "vanilla fp32 find-max-batch",
        "bookkeeping fp32 bs=2", "bookkeeping fp32 bs=4", "bookkeeping fp32 find-max-batch",
    ]  # fmt: skip
    first = p.configurations[0]
    assert first.output.name == "vanilla__DiT-tiny__img64__bs2__fp32__k1__fa.json"
    assert first.config.num_iter == 2 and first.config.warmup_iter == plan.CPU_STEPS["--warmup-iter"]
    assert _config(first.argv) == dataclasses.replace(first.config, output=str(first.output))
    assert any("not meaningful" in line for line in p.info)  # CPU: said plainly
    script = plan.emit_bash(p, args) + 'echo "$TOTAL ${#C_OUT[@]}"; eval "a=(${C_ARGS[2]})"; echo "${a[@]}"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "6 6" and shlex.split(out[1]) == p.configurations[2].argv


def test_plan_refuses_bad_lists_in_one_line(tmp_path):
    for argv, message in (
        (["--batch-sizes", "4,0"], "--batch-sizes must be positive integers, got '0'"),
        (["--experiments", ","], "--experiments ',' names no experiment"),
        (["--precisions", "fp16"], "--precisions"),
    ):
        args = plan.build_sweep_parser().parse_args([*argv, "--output-dir", str(tmp_path), "--device", "cpu"])
        with pytest.raises((ToolError, ValueError), match=message):
            plan.make_plan(args)


def test_resume_keeps_finished_records_skips_after_an_oom_and_brackets_a_search(tmp_path):
    name = "ghost__DiT-XL-2__img256__bs{}__fp32__k1__fa.json"
    for batch, fixture in ((8, "ghost_bs8.json"), (32, "bookkeeping_bs32.json")):  # ok at 8, oom at 32
        (tmp_path / name.format(batch)).write_text((FIXTURE_RECORDS / fixture).read_text())
    decide = lambda batch, bracket=True: resume.decide(str(tmp_path / name.format(batch)), str(batch), bracket)  # noqa: E731
    assert decide(8) == "kept ok" and decide(32) == "kept oom"
    assert decide(64) == "skip 32" and decide(16) == "run"
    assert decide("max") == "run 8,32" and decide("max", bracket=False) == "run"


def test_the_sweep_script_no_longer_parses_flags():
    script = (Path(F.__file__).parents[1] / "run_all_experiments.sh").read_text()
    assert "--batch-sizes|" not in script and "<<'PYEOF'" not in script  # no parser, no heredoc re-validation
    assert os.access(Path(F.__file__).parents[1] / "run_all_experiments.sh", os.R_OK)
