"""single_experiment.py through its real command line (subprocesses), on CPU with the tiny DiT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from memory_test.diffusion_profile import single_experiment as se
from memory_test.diffusion_profile.suite import exit_codes
from memory_test.diffusion_profile.suite.experiments import EXPERIMENTS, single_device_experiments
from memory_test.diffusion_profile.suite.max_batch import search_max_batch
from memory_test.diffusion_profile.suite.measure import COMPILE_BACKEND_ENV, INJECT_OOM_ENV
from memory_test.records import io as records
from tests.conftest import FIXTURE_RECORDS, REPO, record_json

SCRIPT = REPO / "memory_test" / "diffusion_profile" / "single_experiment.py"
TINY = ["--model", "DiT-tiny", "--device", "cpu", "--num-iter", "2", "--warmup-iter", "1", "--batch-size", "2"]


def run_cli(args, *, env_extra=None, script=False, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.update(env_extra or {})
    cmd = (
        [sys.executable, str(SCRIPT)]
        if script
        else [sys.executable, "-m", "memory_test.diffusion_profile.single_experiment"]
    )
    return subprocess.run(cmd + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def load(path):
    return record_json(path)


OOM_ARGS = ["--experiment", "vanilla", *TINY, "--batch-size", "8"]
MAX_ARGS = ["--experiment", "vanilla", *TINY, "--find-max-batch", "--max-batch-start", "2"]
MAX_ARGS += ["--max-batch-resolution", "2", "--probe-num-iter", "1", "--probe-warmup-iter", "0"]
CLI_BAD = {  # the real command line for two bad inputs; the rest are checked in-process (same code, faster)
    "unknown mode": (["--experiment", "no_such_mode"], "invalid choice"),
    "batch 0": (["--experiment", "vanilla", "--batch-size", "0"], "--batch-size must be a positive integer"),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Every subprocess of this file, run together (the machine has 2 cores): name -> (output path, process)."""
    out = tmp_path_factory.mktemp("runs")
    jobs = {}
    for name in single_device_experiments():
        args = ["--experiment", name, "--output", str(out / f"{name}.json"), *TINY]
        if name == "vanilla":  # also: the seed's script-path invocation from its own folder, and the snapshot flag
            jobs[name] = (args + ["--memory-snapshot", str(out / "snap.pickle")], {}, True)
        else:
            jobs[name] = (args, {}, False)
    engine = next(n for n, e in EXPERIMENTS.items() if e.family == "engine" and not e.distributed)
    k_args = ["--experiment", engine, *TINY, "--noise-multiplicity", "3", "--precision", "bf16"]
    jobs["k3_bf16"] = (k_args + ["--output", str(out / "k3_bf16.json")], {}, False)
    jobs["oom"] = (OOM_ARGS + ["--output", str(out / "oom.json")], {INJECT_OOM_ENV: "4"}, False)
    for name in ("vanilla", "flash_clip_bk"):  # compiled: traced as for Inductor (aot_eager: no C++ build on CPU)
        args = ["--experiment", name, *TINY, "--compile", "default", "--output", str(out / f"compiled_{name}.json")]
        jobs[f"compiled_{name}"] = (args, {COMPILE_BACKEND_ENV: "aot_eager"}, False)
    (out / "max").mkdir()
    jobs["max"] = (MAX_ARGS + ["--output", str(out / "max" / "max.json")], {INJECT_OOM_ENV: "3"}, False)
    for case, (args, _) in CLI_BAD.items():
        (out / case).mkdir()
        jobs[case] = (args + ["--model", "DiT-tiny", "--output", str(out / case / "never.json")], {}, False)

    def one(item):
        name, (args, env, script) = item
        return name, run_cli(args, env_extra=env, script=script, cwd=SCRIPT.parent if script else REPO)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(pool.map(one, jobs.items()))
    return out, results


def test_registry_has_baselines_and_engine_modes():
    from memory_test.privacy import MODES

    assert {"vanilla", "opacus_hooks", "opacus_ghost"} <= set(EXPERIMENTS)
    assert set(MODES) <= set(EXPERIMENTS)
    assert not EXPERIMENTS["opacus_hooks"].supports_noise_multiplicity


@pytest.mark.parametrize("name", single_device_experiments())
def test_every_experiment_writes_a_valid_record(cli, name):
    out, results = cli
    proc = results[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = load(out / f"{name}.json")
    assert rec["status"] == "ok" and rec["experiment"] == name and rec["exit_code"] == 0
    cfg = rec["config"]
    assert cfg["batch_size"] == 2 and cfg["model"] == "DiT-tiny" and cfg["device"] == "cpu"
    assert cfg["poisson_sampling"] is False and cfg["noise_multiplicity"] == 1
    engine = EXPERIMENTS[name].mode
    assert cfg["mode"] == (
        None if engine is None else {"norm": engine.norm, "strategy": engine.strategy, "sharding": None}
    )
    model = rec["model"]
    assert model["params"] > 10_000 and 0 < model["trainable_params"] <= model["params"]
    assert model["tokens_per_sample"] == 16  # 8x8 latent, patch 2
    timing = rec["timing"]
    assert len(timing["step_times_ms"]) == 2 and timing["method"] == "perf_counter"
    assert timing["p20_ms"] <= timing["median_ms"] <= timing["p80_ms"]
    assert timing["samples_per_s"] == pytest.approx(2 / (timing["median_ms"] / 1e3))
    assert rec["avg_time_ms"] == pytest.approx(timing["mean_ms"])
    bd = rec["memory"]["breakdown"]
    assert sum(bd["parts_bytes"].values()) == bd["total_bytes"] == rec["memory"]["total_bytes"]
    pos_embed = 4 * model["tokens_per_sample"] * model["hidden_size"]  # the sin-cos buffer
    assert bd["parts_bytes"]["weights"] == 4 * model["params"] + pos_embed
    assert bd["parts_bytes"]["optimizer_state"] >= 2 * 4 * model["trainable_params"]  # AdamW: two moments
    assert rec["peak_memory_mb"] == pytest.approx(bd["total_bytes"] / 2**20)
    assert rec["loss"]["finite"]
    assert rec["backends"]["attention"]
    assert rec["env"]["versions"]["torch"] and rec["env"]["git"]["sha"]
    priv = rec["privacy"]
    if name == "vanilla":
        assert priv is None
        assert rec["memory_snapshot"]["written"] is False and "CPU" in rec["memory_snapshot"]["reason"]
    else:
        assert priv["epsilon"] > 0 and priv["delta"] == pytest.approx(1 / 1_281_167)
        assert priv["sample_rate"] == pytest.approx(2 / 1_281_167)
        assert priv["steps"] == 640_584 and priv["accountant"] == "prv"
        margin = priv["norm_error_margin"]  # engine modes: the margins applied; upstream Opacus: none
        if EXPERIMENTS[name].family == "engine":
            assert margin["enabled"] and margin["coefficient_slack"] == 0.0 and margin["by_path"]  # fp32 on CPU
        else:
            assert margin is None
    if name == "opacus_ghost":
        frozen = rec["experiment_notes"]["frozen_for_baseline"]
        assert frozen and all(".transformer_blocks.0.norm1.emb." in n for n in frozen)
        assert model["trainable_params"] == model["params"] - rec["experiment_notes"]["frozen_for_baseline_params"]
    if EXPERIMENTS[name].family == "engine":
        assert rec["backends"]["kernel_backend"]
        assert sum(rec["backends"]["norm_path_counts"].values()) == len(rec["backends"]["norm_paths_by_layer"]) > 0
        assert bd["parts_bytes"]["dp_state"] > 0
    text = (out / f"{name}.json").read_text()
    assert "per_sample_gradient_norms" not in text  # nothing private about samples leaves the process


@pytest.mark.parametrize("name", ["vanilla", "flash_clip_bk"])
def test_compiled_run_records_its_compile_work_apart_from_the_step_times(cli, name):
    out, results = cli
    assert results[f"compiled_{name}"].returncode == 0, results[f"compiled_{name}"].stderr[-2000:]
    rec = load(out / f"compiled_{name}.json")
    assert rec["status"] == "ok" and rec["config"]["compile"] == "default"
    info = rec["compile"]
    assert info["mode"] == "default" and info["backend"] == "aot_eager" and info["regions"] >= 1
    assert info["graphs"] >= 1 and info["graph_breaks"] == 0 and info["compile_ms"] >= 0
    assert info["during_timing"] == {"graphs": 0, "graph_breaks": 0, "recompiles": 0}  # timing excludes compiling
    assert info["warmup_steps"] >= rec["config"]["warmup_iter"]
    assert info.get("post_programs") == (None if name == "vanilla" else "compiled")


def test_compiled_record_names_carry_the_mode(tmp_path):
    from memory_test.diffusion_profile.suite.plan import record_name

    config = load(FIXTURE_RECORDS / "vanilla_bs8.json")["config"]
    from memory_test.records.record import RunConfig

    eager = RunConfig.from_dict(config)
    assert "__c" not in record_name(eager, "8")
    assert record_name(eager.replace(compile="max-autotune"), "8").endswith("__cmax-autotune.json")


def test_noise_multiplicity_and_bf16(cli):
    out, results = cli
    assert results["k3_bf16"].returncode == 0, results["k3_bf16"].stderr[-3000:]
    rec = load(out / "k3_bf16.json")
    assert rec["config"]["noise_multiplicity"] == 3 and rec["config"]["rows_per_step"] == 6
    assert rec["config"]["precision"] == "bf16" and rec["config"]["autocast_dtype"] == "bfloat16"
    assert rec["timing"]["rows_per_s"] == pytest.approx(3 * rec["timing"]["samples_per_s"])
    assert rec["privacy"]["sample_rate"] == pytest.approx(2 / 1_281_167)  # K does not change q
    assert rec["privacy"]["norm_error_margin"]["coefficient_slack"] == 2 * 2.0**-8 + 2.0**-16  # bf16 operands


@pytest.mark.parametrize("case", list(CLI_BAD))
def test_bad_input_through_the_cli(cli, case):
    out, results = cli
    proc = results[case]
    assert proc.returncode == exit_codes.EXIT_USAGE, proc.stderr
    assert CLI_BAD[case][1] in proc.stderr and "Traceback" not in proc.stderr
    assert list((out / case).iterdir()) == []


BAD_INPUTS = {
    "unknown mode": (["--experiment", "no_such_mode"], "invalid choice"),
    "compile upstream opacus": (
        ["--experiment", "opacus_hooks", "--compile", "default"],
        "do not run under torch.compile",
    ),
    "compile reduce-overhead DP": (
        ["--experiment", "flash_clip_bk", "--compile", "reduce-overhead"],
        "not yet verified exact",
    ),
    "compile mode": (["--compile", "fast"], "invalid choice"),
    "batch 0": (["--batch-size", "0"], "--batch-size must be a positive integer"),
    "negative batch": (["--batch-size", "-4"], "--batch-size must be a positive integer"),
    "no iterations": (["--num-iter", "0"], "--num-iter must be a positive integer"),
    "image size": (["--image-size", "60"], "multiple of 8*patch_size"),
    "RGB channels": (["--in-channels", "3"], "4-channel VAE latents"),
    "upstream with K>1": (["--experiment", "opacus_hooks", "--noise-multiplicity", "2"], "cannot"),
    "unknown model": (["--model", "DiT-XXL/3"], "unknown DiT model"),
    "single-GPU DP mode on 2 processes": (["--experiment", "ghost", "--nproc-per-node", "2"], "not supported sharded"),
    "clip norm": (["--max-grad-norm", "0"], "--max-grad-norm must be"),
    "bracket order": (["--find-max-batch", "--max-batch-bracket", "64,32"], "needs 0 < OK < OOM"),
    "bracket form": (["--find-max-batch", "--max-batch-bracket", "32"], "takes OK,OOM"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS) + ["unwritable output", "output is a folder", "cuda without gpu"])
def test_bad_inputs_exit_nonzero_without_a_file(tmp_path, capsys, case):
    out = tmp_path / "never.json"
    extra = []
    if case == "unwritable output":
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        out, expect = blocker / "sub" / "never.json", "cannot write --output"  # no folder inside a regular file
    elif case == "output is a folder":
        out, expect = tmp_path, "is a directory"
    elif case == "cuda without gpu":
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        extra, expect = ["--device", "cuda"], "no CUDA GPU is available"
    else:
        extra, expect = BAD_INPUTS[case]
    args = ["--experiment", "vanilla", "--model", "DiT-tiny", "--output", str(out), *extra]
    try:
        code = se.main(args)
    except SystemExit as e:  # argparse's own errors (unknown choice)
        code = e.code
    assert code == exit_codes.EXIT_USAGE
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob(".*tmp"))


def test_sharded_mode_on_one_process_is_rejected(tmp_path, capsys):
    dist = [n for n, e in EXPERIMENTS.items() if e.distributed]
    if not dist:
        pytest.skip("the engine registers no sharded mode yet")
    code = se.main(["--experiment", dist[0], "--output", str(tmp_path / "x.json"), *TINY])
    assert code == exit_codes.EXIT_USAGE and "needs --nproc-per-node N >= 2" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_oom_becomes_an_oom_record_with_exit_code_3(cli):
    out, results = cli
    assert results["oom"].returncode == exit_codes.EXIT_OOM, results["oom"].stderr
    rec = load(out / "oom.json")
    assert rec["status"] == "oom" and "out of memory" in rec["message"] and rec["exit_code"] == 3
    assert rec["model"]["params"] > 0  # what was known before the failure is kept
    assert rec["env"]["fault_injection"] == {INJECT_OOM_ENV: "4"}


def test_runtime_failure_becomes_an_error_record(tmp_path, monkeypatch):
    from memory_test.diffusion_profile.suite import measure

    def broken(**kwargs):
        raise RuntimeError("simulated failure while building the model")

    monkeypatch.setattr(measure, "DiTHuggingFaceWrapper", broken)
    out = tmp_path / "err.json"
    code = se.main(["--experiment", "vanilla", "--output", str(out), *TINY])
    assert code == exit_codes.EXIT_ERROR
    rec = load(out)
    assert rec["status"] == "error" and "simulated failure" in rec["message"]
    assert any("simulated failure" in line for line in rec["traceback_tail"])


def test_search_max_batch_doubles_then_bisects():
    calls = []

    def probe_for(limit_ok):
        def probe(b):
            calls.append(b)
            return "ok" if b <= limit_ok else "oom"

        return probe

    assert search_max_batch(probe_for(37), start=1, limit=4096) == (37, 38, False)
    assert calls[:7] == [1, 2, 4, 8, 16, 32, 64] and len(calls) == 7 + 5  # 64->37 in 5 bisections
    calls.clear()
    assert search_max_batch(probe_for(37), start=8, limit=4096, resolution=4)[0] in range(34, 38)
    calls.clear()
    assert search_max_batch(probe_for(10**6), start=8, limit=100) == (100, None, True)
    assert calls == [8, 16, 32, 64, 100]
    calls.clear()
    assert search_max_batch(probe_for(2), start=8, limit=100) == (2, 3, False)  # start itself fails
    assert search_max_batch(probe_for(0), start=1, limit=100) == (0, 1, False)
    calls.clear()  # a known bracket: no doubling, and neither end is probed again
    assert search_max_batch(probe_for(37), start=1, limit=4096, bracket=(32, 64)) == (37, 38, False)
    assert calls == [48, 40, 36, 38, 37]
    calls.clear()
    assert search_max_batch(probe_for(37), start=1, limit=4096, resolution=8, bracket=(32, 64)) == (32, 40, False)
    assert calls == [48, 40]


def test_find_max_batch_cli_probes_in_fresh_processes(cli):
    out, results = cli
    assert results["max"].returncode == 0, results["max"].stderr[-3000:]
    rec = load(out / "max" / "max.json")
    assert rec["record_type"] == "max_batch" and rec["status"] == "ok"
    mb = rec["max_batch"]
    assert mb["max_batch_size"] == 2 and mb["first_oom_batch_size"] == 4
    assert [(p["batch_size"], p["status"]) for p in mb["probes"]] == [(2, "ok"), (4, "oom")]
    assert rec["config"]["batch_size"] == 2 and rec["timing"]["step_times_ms"]
    assert list((out / "max").iterdir()) == [out / "max" / "max.json"]  # the probe folder is gone


def test_atomic_write_refuses_invalid_records_and_leaves_no_temp(tmp_path):
    out = tmp_path / "r.json"
    with pytest.raises(ValueError, match="invalid record"):
        records.write_record_atomic(out, {"schema": "x"})
    assert list(tmp_path.iterdir()) == []
    rec = json.loads((FIXTURE_RECORDS / "vanilla_bs8.json").read_text())
    records.write_record_atomic(out, rec)
    assert list(tmp_path.iterdir()) == [out] and records.record_status(out) == "ok"
    assert records.record_status(tmp_path / "missing.json") == "missing"
    (tmp_path / "bad.json").write_text("{")
    assert records.record_status(tmp_path / "bad.json") == "invalid"


def test_bracketed_search_whose_probes_all_run_out_of_memory(tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_OOM_ENV, "2")
    out = tmp_path / "max.json"
    args = ["--experiment", "vanilla", *TINY, "--find-max-batch", "--max-batch-bracket", "2,8", "--output", str(out)]
    assert se.main([*args, "--batch-size", "1", "--probe-num-iter", "1", "--probe-warmup-iter", "0"]) == 0
    rec = load(out)
    assert [(p["batch_size"], p["status"]) for p in rec["max_batch"]["probes"]] == [(5, "oom"), (3, "oom")]
    assert rec["max_batch"]["max_batch_size"] == 2 and rec["config"]["batch_size"] == 2
    assert rec["config"]["rows_per_step"] == 2


def test_git_state_without_a_checkout_takes_the_sha_from_the_environment(tmp_path, monkeypatch):
    from memory_test.profiling import environment

    assert environment.git_state()["source"] == "git"
    monkeypatch.setenv(environment.GIT_SHA_ENV, "abc1234")
    assert environment.git_state(tmp_path) == {"sha": "abc1234", "dirty": None, "source": "env"}
    monkeypatch.delenv(environment.GIT_SHA_ENV)
    assert environment.git_state(tmp_path) == {"sha": None, "dirty": None, "source": None}


def test_git_sha_from_the_environment_wins_over_a_stale_checkout(monkeypatch):
    """The GPU box's copy carries a .git at the session's first commit: the sha given by the copier is the truth."""
    from memory_test.profiling import environment

    monkeypatch.setenv(environment.GIT_SHA_ENV, "abc1234")
    assert environment.git_state() == {"sha": "abc1234", "dirty": None, "source": "env"}
