"""The sweep's plan refuses, before anything runs, what would make a rerun report the wrong thing or write elsewhere."""

from __future__ import annotations

from memory_test.cli_common.errors import EXIT_BAD_INPUT
from memory_test.diffusion_profile.suite import cli, plan

SMALL = ["--experiments", "vanilla", "--batch-sizes", "2", "--num-iter", "2", "--warmup-iter", "1", "--device", "cpu"]


def _plan(argv, capsys) -> tuple[int, str, str]:
    code = plan.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _sweep_argv(out_dir, *flags, batch="2") -> list[str]:
    """single_experiment's command line for one configuration of the SMALL sweep, as the sweep makes it."""
    config = plan.validated("vanilla", "fp32", batch, ["--num-iter", "2", "--warmup-iter", "1", *flags], out_dir)
    return plan.F.to_argv(config.replace(output=str(out_dir / plan.record_name(config, batch))))


def _recorded_without_run(out_dir, *flags, batch="2") -> None:
    """A finished ("skipped") record of the SMALL configuration, as the sweep writes one, made with ``flags``."""
    argv = _sweep_argv(out_dir, *flags, batch=batch)
    assert cli.run([*argv, "--record-only", "skipped", "--record-message", "test"], "") == 0


def test_rerun_with_other_settings_is_refused_not_reported_as_kept(tmp_path, capsys):
    _recorded_without_run(tmp_path, "--optimizer", "sgd", "--seed", "3")
    code, out, err = _plan(["--output-dir", str(tmp_path), *SMALL, "--emit-bash"], capsys)
    assert code == EXIT_BAD_INPUT and out == ""
    assert "was measured with --seed 3 (this sweep: 0), --optimizer sgd (this sweep: adamw)" in err
    assert len(err.splitlines()) == 1 and "choose another --output-dir" in err


def test_rerun_with_the_same_settings_resumes(tmp_path, capsys):
    _recorded_without_run(tmp_path, "--optimizer", "sgd")
    code, out, err = _plan(["--output-dir", str(tmp_path), *SMALL, "--optimizer", "sgd", "--emit-bash"], capsys)
    assert code == 0 and "TOTAL=1" in out, err


def test_default_experiments_under_compile_leave_out_what_cannot_compile(tmp_path, capsys):
    base = ["--output-dir", str(tmp_path), "--batch-sizes", "2", "--device", "cpu"]
    code, out, err = _plan([*base, "--compile", "reduce-overhead"], capsys)
    assert code == 0, err
    assert "note: leaving out opacus_hooks: " in out and "note: leaving out ghost: " in out
    assert [line.split(" -> ")[0] for line in out.splitlines() if " -> " in line] == ["vanilla fp32 bs=2"]
    code, _, err = _plan([*base, "--compile", "default", "--experiments", "vanilla,opacus_hooks"], capsys)
    assert code == EXIT_BAD_INPUT and "opacus_hooks is unmodified upstream Opacus" in err  # named: refused


def test_output_dir_empty_or_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = _plan(["--output-dir", "", *SMALL], capsys)
    assert code == EXIT_BAD_INPUT and "--output-dir is empty" in err
    code, _, err = _plan(["--output-dir", str(tmp_path / "afile" / "sub"), *SMALL], capsys)
    assert code == EXIT_BAD_INPUT and f"{tmp_path / 'afile'} is a file, not a folder" in err
    assert "sweep_flag_check" not in err  # names the folder given, not a file the user never named


MAX_ONLY = [*SMALL, "--max-batch-only"]


def test_a_kept_max_batch_record_searched_with_other_settings_is_refused(tmp_path, capsys):
    _recorded_without_run(tmp_path, "--max-batch-limit", "8", "--probe-num-iter", "3", batch="max")
    base = ["--output-dir", str(tmp_path), *MAX_ONLY, "--emit-bash"]
    code, out, err = _plan([*base, "--max-batch-limit", "16", "--max-batch-resolution", "2"], capsys)
    assert code == EXIT_BAD_INPUT and out == ""
    changed = "--max-batch-limit 8 (this sweep: 16), --max-batch-resolution 1 (this sweep: 2), --probe-num-iter 3"
    assert f"was measured with {changed} (this sweep: 2);" in err, err
    code, out, err = _plan([*base, "--max-batch-limit", "8", "--probe-num-iter", "3"], capsys)
    assert code == 0 and "TOTAL=1" in out, err


def test_a_finished_search_resumes_under_its_own_flags(tmp_path, capsys):
    # An ok search's record holds its probe counts as num_iter/warmup_iter: a rerun must not read them as changed.
    search = ["--max-batch-limit", "1", "--probe-num-iter", "1", "--probe-warmup-iter", "0"]
    assert cli.run(_sweep_argv(tmp_path, *search, batch="max"), "") == 0  # one probe, at the limit
    code, out, err = _plan(["--output-dir", str(tmp_path), *MAX_ONLY, *search, "--emit-bash"], capsys)
    assert code == 0 and "TOTAL=1" in out, err
    code, _, err = _plan(["--output-dir", str(tmp_path), *MAX_ONLY, *search, "--probe-warmup-iter", "1"], capsys)
    assert code == EXIT_BAD_INPUT and "--probe-warmup-iter 0 (this sweep: 1)" in err, err


def test_a_search_start_with_the_sweeps_bracketing_is_refused_not_ignored(tmp_path, capsys):
    base = ["--output-dir", str(tmp_path), *SMALL, "--find-max-batch", "--max-batch-start", "4", "--emit-bash"]
    code, out, err = _plan(base, capsys)
    assert code == EXIT_BAD_INPUT and out == "" and len(err.splitlines()) == 1
    assert "--max-batch-start with the sweep's bracketing" in err and "add --no-max-batch-bracket" in err
    code, out, err = _plan([*base, "--no-max-batch-bracket"], capsys)
    assert code == 0 and "USE_BRACKET=0" in out and "--max-batch-start 4" in out, err
    code, out, err = _plan(["--output-dir", str(tmp_path), *SMALL, "--find-max-batch", "--emit-bash"], capsys)
    assert code == 0 and "USE_BRACKET=1" in out and "--max-batch-start" not in out, err  # room for its bracket


def test_an_unknown_experiment_lists_the_suites_names_not_the_engines(tmp_path, capsys):
    from memory_test.diffusion_profile.suite.experiments import experiment_names

    code, _, err = _plan(["--output-dir", str(tmp_path), "--experiments", "hooks", "--device", "cpu"], capsys)
    assert code == EXIT_BAD_INPUT and "unknown experiment 'hooks'" in err
    listed = err.split("; valid: ", 1)[1].split(" — ", 1)[0].split(", ")
    assert listed == experiment_names() and "opacus_hooks" in listed and "hooks" not in listed
