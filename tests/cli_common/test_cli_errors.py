"""Every entry point ends bad input with one line `<tool>: error: <what> — <what to do>`, exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from memory_test.cli_common import errors
from memory_test.diffusion import latent_dataset as ld
from memory_test.diffusion_profile import inspect_dit_model, single_experiment
from memory_test.diffusion_profile import visualize_memory_breakdown as viz
from memory_test.train import run as train_dp
from tests.conftest import REPO, tiny_latents

SWEEP = REPO / "memory_test" / "diffusion_profile" / "run_all_experiments.sh"


def _cases(tmp: Path) -> dict:
    """tool name -> (main, argv, text the line must contain)."""
    latents = tiny_latents(tmp / "lat.safetensors")
    a_file = tmp / "a_file"
    a_file.write_text("x")
    train = ["--latents", str(latents), "--model", "DiT-tiny", "--noise-multiplier", "1", "--delta", "1e-3"]
    return {
        "train_dp": (train_dp.main, [*train, "--batch-size", "0"], "--batch-size must be an integer >= 1"),
        "latent_dataset": (ld.main, ["--images", str(tmp / "none"), "--out", str(tmp / "o.st")], "does not exist"),
        "single_experiment.py": (
            single_experiment.main,
            ["--experiment", "vanilla", "--output", str(a_file / "r.json"), "--model", "DiT-tiny"],
            "is a file, not a folder",
        ),
        "visualize_memory_breakdown.py": (
            viz.main,
            ["--results-dir", str(tmp), "--out-dir", str(a_file / "plots")],
            "is a file, not a folder",
        ),
        "inspect_dit_model.py": (inspect_dit_model.main, ["--model", "DiT-tiny", "--mode", "foo"], "--mode 'foo'"),
    }


TOOLS = ["train_dp", "latent_dataset", "single_experiment.py", "visualize_memory_breakdown.py", "inspect_dit_model.py"]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_ends_bad_input_with_one_line_and_exit_2(tool, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    main, argv, expect = _cases(tmp_path)[tool]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == errors.EXIT_BAD_INPUT, err
    assert len(err.splitlines()) == 1 and err.startswith(f"{tool}: error: ") and " — " in err, err
    assert expect in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.partial"))


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as stop:
        train_dp.main(["--latents", "x", "--noise-multiplier", "abc"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("train_dp: error: argument --noise-multiplier: invalid float value") and "--help" in err


def test_debug_env_shows_the_traceback_and_unexpected_errors_say_how(monkeypatch, capsys):
    def broken():
        raise RuntimeError("boom")

    def refused():
        raise errors.ToolError("bad", "fix")

    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    assert errors.run_tool("tool", broken) == errors.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("tool: error: RuntimeError: boom — ") and f"{errors.DEBUG_ENV}=1" in err
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="boom"):
        errors.run_tool("tool", broken)
    with pytest.raises(errors.ToolError):
        errors.run_tool("tool", refused)


def test_sweep_checks_passed_through_values_before_running(tmp_path):
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    base = ["bash", str(SWEEP), "--experiments", "vanilla", "--device", "cpu", "--output-dir", str(tmp_path / "out")]
    for extra, expect in (
        (["--noise-multiplier", "abc"], "argument --noise-multiplier: invalid float value: 'abc'"),
        (["--experiments", ","], "--experiments ',' names no experiment"),
    ):
        r = subprocess.run([*base, *extra], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stdout + r.stderr
        line = r.stderr.strip()
        assert len(line.splitlines()) == 1 and line.startswith("run_all_experiments.sh: error: ") and expect in line
        assert not (tmp_path / "out").exists()  # nothing started, nothing created


def test_flags_are_never_abbreviated(tmp_path, capsys):
    from memory_test.diffusion_profile.suite import plan

    # single_experiment's --output given to the sweep must not become --output-dir x.json
    with pytest.raises(SystemExit) as stop:
        plan.main(["--output", str(tmp_path / "x.json"), "--dry-run"])
    assert stop.value.code == errors.EXIT_BAD_INPUT
    assert "unrecognized arguments: --output" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_inspect_lists_only_the_modes_it_accepts(capsys):
    assert inspect_dit_model.main(["--model", "DiT-tiny", "--mode", "foo"]) == errors.EXIT_BAD_INPUT
    listed = capsys.readouterr().err.strip().split(" — pick one of ", 1)[-1].split(", ")
    assert "bookkeeping" in listed and "hooks" not in listed, listed
    for mode in listed:  # every mode it names passes its own check (no model is built here)
        inspect_dit_model.check_args(inspect_dit_model._parse(["--mode", mode]))
