"""single_experiment's smaller input faults: a file where a folder should be, a CPU allocation failure, σ = 0."""

from __future__ import annotations

import pytest
import torch

from memory_test.diffusion_profile import single_experiment as se
from memory_test.diffusion_profile.suite import exit_codes, run
from memory_test.records import io as records

TINY = ["--model", "DiT-tiny", "--device", "cpu", "--num-iter", "1", "--warmup-iter", "0", "--batch-size", "2"]


def test_output_under_a_file_says_the_file_is_not_a_folder(tmp_path, capsys):
    (tmp_path / "results").write_text("not a folder")
    out = tmp_path / "results" / "sub" / "r.json"
    assert se.main(["--experiment", "vanilla", "--output", str(out), *TINY]) == exit_codes.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{tmp_path / 'results'} is a file, not a folder" in err and "File exists" not in err


def test_cpu_allocation_failure_is_recorded_as_oom(tmp_path, monkeypatch):
    try:
        torch.empty(2**60, dtype=torch.uint8)  # the CPU allocator's own refusal, not a made-up message
    except RuntimeError as e:
        real_failure = e
    else:
        pytest.skip("this machine allocated 1 EiB")

    def runs_out(config, device, partial, dist=None):
        raise real_failure

    monkeypatch.setattr(run, "measure", runs_out)
    out = tmp_path / "r.json"
    assert se.main(["--experiment", "vanilla", "--output", str(out), *TINY]) == exit_codes.EXIT_OOM
    rec, _ = records.load_record(out)
    assert rec.status == "oom" and "can't allocate memory" in rec.message


def test_sigma_zero_records_epsilon_as_infinite_never_a_number(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--experiment", "ghost", "--output", str(out), "--noise-multiplier", "0", *TINY]
    assert se.main(args + ["--record-only", "skipped"]) == 0  # the record's privacy block, without a run
    assert "not private" in capsys.readouterr().err
    privacy = records.load_record(out)[0].privacy
    assert privacy.epsilon is None and privacy.epsilon_infinite is True and "infinite" in privacy.epsilon_note


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_the_seeders_refuse_is_bad_input_not_an_error_record(tmp_path, capsys, seed):
    out = tmp_path / "r.json"
    assert se.main(["--experiment", "vanilla", "--output", str(out), *TINY, "--seed", seed]) == exit_codes.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--seed must be an integer in [0, 2**31), got {seed} — see `single_experiment.py --help`")
    assert not out.exists()


def test_memory_snapshot_on_the_output_file_is_refused(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--experiment", "vanilla", "--output", str(out), "--memory-snapshot", str(tmp_path / "." / "r.json")]
    assert se.main([*argv, *TINY]) == exit_codes.EXIT_USAGE
    assert "--memory-snapshot is the --output file" in capsys.readouterr().err and not out.exists()


def test_a_search_start_with_a_bracket_is_refused_not_ignored(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--experiment", "vanilla", "--output", str(out), *TINY, "--find-max-batch", "--max-batch-start", "4"]
    assert se.main([*argv, "--max-batch-bracket", "2,8"]) == exit_codes.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("single_experiment.py: error: --max-batch-start with ")
    assert "--max-batch-bracket" in err and " — leave out --max-batch-start" in err
    assert not out.exists()
