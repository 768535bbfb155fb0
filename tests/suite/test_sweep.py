"""run_all_experiments.sh on CPU: records, OOM skipping, resume, Ctrl-C, the visualizer at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from memory_test.diffusion_profile.suite.measure import INJECT_OOM_ENV
from memory_test.records import io as records
from tests.conftest import REPO, record_json

SWEEP = REPO / "memory_test" / "diffusion_profile" / "run_all_experiments.sh"
BASE = ["--experiments", "vanilla,ghost", "--num-iter", "1", "--warmup-iter", "0", "--device", "cpu"]


def sweep(args, env_extra=None, **kw):
    env = dict(os.environ, **(env_extra or {}))
    env.pop("VIRTUAL_ENV", None)  # the script picks the repo's .venv itself
    return subprocess.run(["bash", str(SWEEP), *args], env=env, capture_output=True, text=True, timeout=600, **kw)


def statuses(folder: Path) -> dict[str, str]:
    return {p.name: records.record_status(p) for p in sorted(folder.glob("*.json"))}


def test_help_and_bad_options():
    r = sweep(["--help"])
    assert r.returncode == 0
    for flag in ("--batch-sizes", "--precisions", "--output-dir", "--find-max-batch", "--no-flash-attention"):
        assert flag in r.stdout
    assert sweep(["--bogus"]).returncode == 2
    bad = sweep(["--batch-sizes", "4,0"])
    assert bad.returncode == 2 and "positive integers" in bad.stderr
    multi = sweep(["--nproc-per-node", "2", "--experiments", "ghost", "--device", "cpu"])
    assert multi.returncode == 2 and "not supported sharded" in multi.stderr
    single = sweep(["--experiments", "ghost_fsdp_bk", "--device", "cpu"])
    assert single.returncode == 2 and "needs --nproc-per-node N >= 2" in single.stderr


def test_sweep_records_oom_skips_resumes_and_plots(tmp_path):
    out = tmp_path / "res"
    args = [*BASE, "--batch-sizes", "4,1,8", "--output-dir", str(out)]
    env = {INJECT_OOM_ENV: "2"}  # batches above 2 "run out of memory"
    r = sweep(args, env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    st = statuses(out)
    name = "{}__DiT-tiny__img64__bs{}__fp32__k1__fa.json"
    assert st == {
        name.format("ghost", 1): "ok",
        name.format("ghost", 4): "oom",
        name.format("ghost", 8): "skipped",
        name.format("vanilla", 1): "ok",
        name.format("vanilla", 4): "oom",
        name.format("vanilla", 8): "skipped",
    }
    skipped = record_json(out / name.format("ghost", 8))
    assert "batch 4" in skipped["message"] and skipped["config"]["batch_size"] == 8
    assert "ETA" in r.stdout and "[6/6]" in r.stdout
    assert (out / "plots" / "summary.md").is_file() and "| vanilla | 1 | ok |" in r.stdout  # summary printed
    assert list((out / "plots").glob("peak_memory_vs_batch__CPU*.png"))
    assert not list(out.glob(".*"))  # no temp or log files left

    # Rerun: everything is kept, nothing rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.json")}
    args.append("--no-plots")
    r2 = sweep(args, env)
    assert r2.returncode == 0 and r2.stdout.count(" kept (") == 6
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.json")} == mtimes

    # A lost record is redone alone; an error record is retried.
    (out / name.format("vanilla", 1)).unlink()
    r3 = sweep(args, env)
    assert r3.returncode == 0 and r3.stdout.count(" kept (") == 5
    assert statuses(out) == st


def test_max_batch_search_bisects_between_the_grid_records(tmp_path):
    out = tmp_path / "res"
    env = {INJECT_OOM_ENV: "5"}
    grid = ["--experiments", "vanilla", "--num-iter", "1", "--warmup-iter", "0", "--device", "cpu", "--no-plots"]
    grid += ["--output-dir", str(out), "--batch-sizes", "2,8"]
    assert sweep(grid, env).returncode == 0
    r = sweep([*grid, "--max-batch-only"], env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "find-max-batch (2,8)" in r.stdout
    rec = record_json(out / "vanilla__DiT-tiny__img64__bsmax__fp32__k1__fa.json")
    mb = rec["max_batch"]
    assert (mb["max_batch_size"], mb["first_oom_batch_size"]) == (5, 6)
    assert [p["batch_size"] for p in mb["probes"]] == [5, 6]  # 2 and 8 came from the grid, not probed again
    assert rec["config"]["find_max_batch"]["bracket"] == {
        "ok_batch_size": 2,
        "oom_batch_size": 8,
        "source": "--max-batch-bracket",
    }


def test_ctrl_c_leaves_no_partial_file_and_resume_completes(tmp_path):
    """Also the default sweep without a GPU: no --model/--device given, so it must say it runs DiT-tiny on CPU."""
    out = tmp_path / "res"
    args = ["--experiments", "vanilla", "--num-iter", "1", "--warmup-iter", "0", "--batch-sizes", "1,2"]
    args += ["--output-dir", str(out), "--no-plots"]
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    out.mkdir()
    foreign = out / ".someone_elses_record.json.x1y2z3.tmp"  # another writer's in-flight file: not the sweep's
    foreign.write_text("{")
    proc = subprocess.Popen(["bash", str(SWEEP), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.json")):  # interrupt during the 2nd configuration
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert "rerun the same command to resume" in err.decode()
    left = statuses(out)
    assert left and set(left.values()) == {"ok"}  # only complete records
    assert [p for p in out.iterdir() if p.name.startswith(".")] == [foreign]  # kept; none of the sweep's own left
    foreign.unlink()
    r = sweep(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count(" kept (") == len(left)
    assert len(statuses(out)) == 2 and set(statuses(out).values()) == {"ok"}
    rec = record_json(next(out.glob("*.json")))
    if rec["env"]["device_type"] == "cpu":
        assert "No CUDA GPU" in r.stdout and "DiT-tiny" in r.stdout
        assert rec["config"]["model"] == "DiT-tiny" and rec["config"]["device"] == "cpu"
