"""single_experiment.py --find-max-batch: doubling then bisection, each probe a fresh process."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from memory_test.diffusion_profile.run_config import REPO_ROOT, privacy_block
from memory_test.diffusion_profile.run_measure import _env, base_record
from memory_test.profiling import records

# ----- max batch search ---------------------------------------------------------------------------------------


def search_max_batch(
    probe, start: int, limit: int, resolution: int = 1, bracket: tuple[int, int] | None = None
) -> tuple[int, int | None, bool]:
    """Largest batch for which ``probe(b)`` is "ok": double from ``start`` until a failure or ``limit``, then bisect.

    ``probe`` returns "ok" or "oom" (raise to abort). A known (ok, oom) ``bracket`` replaces the doubling. Returns
    (max_ok (0 if none), smallest oom seen or None, whether the limit was reached without an oom).
    """
    if bracket is not None:
        ok, bad = bracket
        return _bisect(probe, ok, bad, resolution)
    ok, bad = 0, None
    b = min(start, limit)
    while True:
        if probe(b) == "ok":
            ok = b
            if b >= limit:
                return ok, None, True
            b = min(2 * b, limit)
        else:
            bad = b
            break
    return _bisect(probe, ok, bad, resolution)


def _bisect(probe, ok: int, bad: int, resolution: int) -> tuple[int, int | None, bool]:
    while bad - ok > resolution:
        mid = (ok + bad) // 2
        if probe(mid) == "ok":
            ok = mid
        else:
            bad = mid
    return ok, bad, False


class ProbeFailed(RuntimeError):
    pass


def config_to_argv(config: dict) -> list[str]:
    """Command-line flags reproducing ``config`` (the batch size and iteration counts are set by the caller)."""
    argv = [
        "--experiment", config["experiment"], "--model", config["model"],
        "--image-size", str(config["image_size"]), "--in-channels", str(config["in_channels"]),
        "--num-classes", str(config["num_classes"]), "--precision", config["precision"],
        "--device", config["device"], "--optimizer", config["optimizer"], "--lr", repr(config["lr"]),
        "--noise-multiplier", repr(config["noise_multiplier"]), "--max-grad-norm", repr(config["max_grad_norm"]),
        "--seed", str(config["seed"]), "--noise-multiplicity", str(config["noise_multiplicity"]),
        "--dataset-size", str(config["dataset_size"]), "--delta", repr(config["delta"]),
        "--epochs", repr(config["epochs"]), "--accountant", config["accountant"],
    ]  # fmt: skip
    argv.append("--use-flash-attention" if config["use_flash_attention"] else "--no-flash-attention")
    if config.get("nproc_per_node", 1) > 1:  # each probe is its own torchrun launch
        argv += ["--nproc-per-node", str(config["nproc_per_node"])]
    return argv


def find_max_batch(config: dict, device, args: argparse.Namespace) -> tuple[dict, int]:
    """Doubling then bisection; each probe is a fresh ``single_experiment`` process with a few iterations."""
    t0 = time.perf_counter()
    limit = args.max_batch_limit or (65536 if device.type == "cuda" else 64)
    start = args.max_batch_start or config["batch_size"]
    search = {
        "method": "doubling from start, then bisection between the last ok and the first oom batch",
        "start": start,
        "limit": limit,
        "resolution": args.max_batch_resolution,
        "probe_num_iter": args.probe_num_iter,
        "probe_warmup_iter": args.probe_warmup_iter,
        "probe_timeout_s": args.probe_timeout,
    }
    if args.max_batch_bracket is not None:
        ok, oom = args.max_batch_bracket
        search["method"] = "bisection between a batch known to run and one known to run out of memory"
        search["bracket"] = {"ok_batch_size": ok, "oom_batch_size": oom, "source": "--max-batch-bracket"}
        search["start"] = None  # no doubling
    if device.type != "cuda":
        search["note"] = "on CPU nothing raises out-of-memory: the search stops at the limit"
    out = Path(args.output)
    probe_dir = out.parent / f".{out.name}.probes"
    probe_dir.mkdir(parents=True, exist_ok=True)
    probes: list[dict] = []
    best: dict = {}

    def probe(b: int) -> str:
        path = probe_dir / f"bs{b}.json"
        cmd = [sys.executable, "-m", "memory_test.diffusion_profile.single_experiment", *config_to_argv(config)]
        cmd += ["--batch-size", str(b), "--num-iter", str(args.probe_num_iter)]
        cmd += ["--warmup-iter", str(args.probe_warmup_iter), "--output", str(path)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        print(f"[find-max-batch] {config['experiment']}: probing batch {b} ...", file=sys.stderr, flush=True)
        pt = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.probe_timeout)
            code, tail = r.returncode, (r.stderr or "").strip().splitlines()[-5:]
        except subprocess.TimeoutExpired:
            code, tail = None, [f"probe timed out after {args.probe_timeout}s"]
        rec, why = records.load_record(path) if path.exists() else (None, "no record written")
        entry = {"batch_size": b, "exit_code": code, "wall_s": round(time.perf_counter() - pt, 2)}
        if rec is None:
            entry.update(status="error", message=f"{why}; stderr tail: {' | '.join(tail)}")
        else:
            mem, timing = rec.get("memory") or {}, rec.get("timing") or {}
            entry.update(
                status=rec["status"],
                message=rec.get("message"),
                peak_allocated_bytes=mem.get("peak_allocated_bytes"),
                total_bytes=mem.get("total_bytes"),
                median_ms=timing.get("median_ms"),
                samples_per_s=timing.get("samples_per_s"),
            )
        probes.append(entry)
        print(f"[find-max-batch]   batch {b}: {entry['status']}", file=sys.stderr, flush=True)
        if entry["status"] == "ok":
            if not best or b > best["config"]["batch_size"]:
                best.clear()
                best.update(rec)
            return "ok"
        if entry["status"] == "oom":
            return "oom"
        raise ProbeFailed(f"probe at batch {b} failed: {entry['message']}")

    result_cfg = dict(config, find_max_batch=search)
    rec = base_record(result_cfg, _env(device), record_type="max_batch")
    try:
        max_ok, first_oom, limit_reached = search_max_batch(
            probe, start, limit, args.max_batch_resolution, bracket=args.max_batch_bracket
        )
        if max_ok == 0:
            rec["status"], code = "oom", records.EXIT_OOM
            rec["message"] = f"even batch {first_oom} ran out of memory"
        else:
            rec["status"], code = "ok", records.EXIT_OK
        rec["max_batch"] = {"max_batch_size": max_ok, "first_oom_batch_size": first_oom, "limit_reached": limit_reached}
    except ProbeFailed as e:
        rec["status"], code, rec["message"] = "error", records.EXIT_ERROR, str(e)
        rec["max_batch"] = {"max_batch_size": None, "first_oom_batch_size": None, "limit_reached": False}
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    rec["max_batch"]["probes"] = probes
    if best:
        rec["config"]["batch_size"] = best["config"]["batch_size"]
        rec["config"]["rows_per_step"] = best["config"]["rows_per_step"]
        rec["config"]["num_iter"], rec["config"]["warmup_iter"] = args.probe_num_iter, args.probe_warmup_iter
        rec["privacy"] = privacy_block(rec["config"])
        for key in ("model", "peak_memory_mb", "avg_time_ms", "timing", "memory", "backends", "experiment_notes"):
            rec[key] = best.get(key)
        if best.get("distributed") is not None:  # a probe over N > 1 processes
            rec["distributed"] = best["distributed"]
    elif rec["status"] == "ok":  # every probe ran out of memory: the bracket's ok batch is the answer
        b = rec["max_batch"]["max_batch_size"]
        rec["config"]["batch_size"], rec["config"]["rows_per_step"] = b, b * config["noise_multiplicity"]
        if "global_batch_size" in rec["config"]:
            rec["config"]["global_batch_size"] = b * config.get("nproc_per_node", 1)
        rec["privacy"] = privacy_block(rec["config"])
    rec["exit_code"] = code
    rec["duration_s"] = time.perf_counter() - t0
    return rec, code
