"""single_experiment.py --nproc-per-node 2 on CPU (gloo): it starts torchrun itself and writes one record."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from memory_test.cli_common.errors import ToolError
from memory_test.diffusion_profile.suite import exit_codes
from memory_test.records import io as records
from tests.conftest import REPO, record_json

TINY = ["--model", "DiT-tiny", "--device", "cpu", "--num-iter", "2", "--warmup-iter", "1", "--batch-size", "2"]
CASES = {"ghost_fsdp_bk": ["--nproc-per-node", "2"], "vanilla": ["--nproc-per-node", "2"]}


def run_cli(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "memory_test.diffusion_profile.single_experiment", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    jobs = {name: ["--experiment", name, *TINY, *extra, "--output", str(out / f"{name}.json")]
            for name, extra in CASES.items()}  # fmt: skip
    jobs["oom"] = ["--experiment", "ghost_fsdp_bk", *TINY, "--nproc-per-node", "2", "--output", str(out / "oom.json")]
    envs = {"oom": {"MEMORY_TEST_INJECT_OOM_ABOVE_BATCH": "1"}}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {k: pool.submit(run_cli, v, envs.get(k)) for k, v in jobs.items()}
        return out, {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("experiment", list(CASES))
def test_two_processes_write_one_valid_record(runs, experiment):
    out, results = runs
    proc = results[experiment]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rec = record_json(out / f"{experiment}.json")
    assert records.validate_record(rec) == []
    assert rec["status"] == "ok" and rec["experiment"] == experiment
    d = rec["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo" and d["fsdp2_sharded"] is True
    assert len(d["per_rank_peak_bytes"]) == 2 and all(isinstance(p, int) for p in d["per_rank_peak_bytes"])
    assert d["peak_bytes_max"] == max(d["per_rank_peak_bytes"])
    assert d["peak_bytes_mean"] == pytest.approx(sum(d["per_rank_peak_bytes"]) / 2)
    assert d["per_gpu_batch_size"] == 2 and d["global_batch_size"] == 4
    assert rec["config"]["world_size"] == 2 and rec["config"]["global_batch_size"] == 4
    t = rec["timing"]
    assert d["global_samples_per_s"] == pytest.approx(4 / (t["median_ms"] / 1e3))
    assert len(t["step_times_ms"]) == 2
    if experiment != "vanilla":  # ε for the global batch: q = N*B / dataset size
        assert rec["privacy"]["sample_rate"] == pytest.approx(4 / rec["config"]["dataset_size"])
    assert rec["loss"]["finite"]
    assert not list(out.glob(".*.ranks"))  # the parent's per-rank folder is gone


def test_an_oom_on_the_ranks_becomes_one_oom_record(runs):
    out, results = runs
    assert results["oom"].returncode == exit_codes.EXIT_OOM, results["oom"].stderr[-3000:]
    rec = record_json(out / "oom.json")
    assert rec["status"] == "oom" and rec["message"].startswith("rank ") and "out of memory" in rec["message"]
    assert rec["distributed"]["world_size"] == 2 and rec["distributed"]["failed_ranks"]


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--experiment", "ghost_fsdp_bk", "--nproc-per-node", "1"], "needs --nproc-per-node N >= 2"),
        (["--experiment", "bookkeeping", "--nproc-per-node", "2"], "not supported sharded"),
        (["--experiment", "opacus_ghost", "--nproc-per-node", "2"], "not supported sharded"),
    ],
)
def test_bad_process_counts_exit_2_without_a_file(tmp_path, args, expect):
    proc = run_cli([*TINY, *args, "--output", str(tmp_path / "x.json")])
    assert proc.returncode == exit_codes.EXIT_USAGE
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_more_processes_than_gpus_or_a_fixed_gpu_is_a_usage_error(monkeypatch):
    import torch

    from memory_test.diffusion_profile.suite import distributed_rules as dl

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ToolError, match="only 1 GPU"):
        dl.check_device(torch.device("cuda"), "cuda", 2)
    with pytest.raises(ToolError, match="rank r uses cuda:r"):
        dl.check_device(torch.device("cuda", 0), "cuda:0", 2)
    dl.check_device(torch.device("cuda"), "cuda", 1)  # one process: the single-GPU path checks the device
    dl.check_device(torch.device("cpu"), "cpu", 4)  # gloo: any number of CPU processes
