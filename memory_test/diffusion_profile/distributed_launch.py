"""Multi-process runs of ``single_experiment.py``: the torchrun launch (parent) and the FSDP2 worker side.

``single_experiment.py --nproc-per-node N`` (N > 1) starts ``torchrun --standalone --nproc-per-node=N`` on itself.
Every worker (``LOCAL_RANK`` set) initialises ``torch.distributed`` ("nccl" on CUDA with device
``cuda:LOCAL_RANK``, "gloo" on CPU), builds the same seeded DiT, shards it with
``memory_test.privacy.fsdp.shard_dit`` (FSDP2), and trains on its own slice of a seeded global batch:

- ``--batch-size B`` is the per-GPU batch; the global batch is N·B (the DP data loader, hence the noise scale and
  the sampling rate of the reported ε, use N·B).
- Step time: for every measured step, the maximum over ranks of each rank's own step time (CUDA events on GPU,
  perf_counter on CPU); the usual percentiles are taken over those per-step maxima, and ``samples_per_s`` is the
  global N·B divided by their median.
- Memory: each rank's peak (``torch.cuda.max_memory_allocated`` on GPU, sampled RSS growth on CPU) is gathered
  with ``all_gather_object``; rank 0 writes the one record, with a ``distributed`` block (max and mean over ranks).

Failures: a rank whose run fails writes its own record into a folder the parent names (env
``MEMORY_TEST_DIST_RANK_DIR``); torchrun then stops the others and the parent writes one ``oom`` (if any rank ran
out of memory) or ``error`` record for the whole run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from memory_test.profiling import records

RANK_DIR_ENV = "MEMORY_TEST_DIST_RANK_DIR"
# Single-GPU experiments that run as plain data-parallel FSDP2 baselines with N > 1 (no per-sample clipping).
FSDP_BASELINES = ("vanilla",)


class DistUsageError(ValueError):
    """Bad multi-process request; single_experiment turns it into its UsageError (exit 2, no record)."""


def is_worker() -> bool:
    """True inside a torchrun worker (single_experiment then runs one rank instead of launching)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def sharded_experiments() -> list[str]:
    from memory_test.diffusion_profile.experiments import EXPERIMENTS

    return [n for n, e in EXPERIMENTS.items() if e.distributed]


def check_request(exp, nproc: int) -> None:
    """Which experiments may run on how many processes; DistUsageError otherwise (never a silent 1-GPU run)."""
    from memory_test.diffusion_profile.experiments import single_device_experiments

    sharded = ", ".join(sharded_experiments())
    if exp.distributed and nproc < 2:
        raise DistUsageError(
            f"--experiment {exp.name} shards the model over processes (FSDP2) and needs --nproc-per-node N >= 2 "
            f"(got {nproc}); one process would be a single-GPU run under a sharded name. Single-GPU experiments: "
            + ", ".join(single_device_experiments())
        )
    if nproc > 1 and not exp.distributed and exp.name not in FSDP_BASELINES:
        raise DistUsageError(
            f"--experiment {exp.name} with --nproc-per-node {nproc}: not supported sharded (each rank would clip "
            f"and noise its own samples unsynchronised); use a sharded DP mode ({sharded}), or "
            f"{'/'.join(FSDP_BASELINES)} as the FSDP2 baseline, or --nproc-per-node 1"
        )


def worker_device(requested):
    """This rank's device: cuda:LOCAL_RANK when the run is on CUDA, else cpu."""
    import torch

    if requested.type != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]))


def check_device(device, device_arg: str, nproc: int) -> None:
    """N processes on CUDA need N visible GPUs and no fixed --device cuda:K (each rank takes cuda:LOCAL_RANK)."""
    import torch

    if nproc < 2 or device.type != "cuda":
        return
    if device.index is not None:
        raise DistUsageError(
            f"--device {device_arg} with --nproc-per-node {nproc}: rank r uses cuda:r; pass --device cuda "
            "(choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    count = torch.cuda.device_count()
    if nproc > count:
        raise DistUsageError(
            f"--nproc-per-node {nproc}: only {count} GPU(s) visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --nproc-per-node <= {count}"
        )


# ----- worker side --------------------------------------------------------------------------------------------


class WorkerContext:
    """One rank's view: its rank, the world, and the hooks ``single_experiment.measure`` calls."""

    def __init__(self, device, sharded: bool):
        import torch.distributed as dist

        self.dist = dist
        self.device = device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = dist.get_backend()
        self.sharded = sharded

    def shard(self, model):
        """FSDP2 on each DiT block and the root (in place), before the optimizer and make_private."""
        if self.sharded:
            from memory_test.privacy.fsdp import shard_dit

            shard_dit(model)
        return model

    def local_rows(self, tensor, per_rank: int):
        """This rank's contiguous slice of a global batch tensor."""
        return tensor[self.rank * per_rank : (self.rank + 1) * per_rank]

    def combine(self, result: dict, step_ms: list[float], per_rank_batch: int, noise_multiplicity: int) -> dict:
        """Gather step times and peaks from every rank (a collective: all ranks call it); global timing on top."""
        from memory_test.profiling.tracker import timing_summary

        mem = result["memory"]
        mine = {
            "step_ms": step_ms,
            "peak_allocated_bytes": mem.get("peak_allocated_bytes"),
            "total_bytes": mem.get("total_bytes"),
            "loss": result["loss"]["final_mean_loss"],
        }
        every: list = [None] * self.world_size
        self.dist.all_gather_object(every, mine)
        per_step = [max(times) for times in zip(*(r["step_ms"] for r in every))]
        global_batch = per_rank_batch * self.world_size
        timing = dict(result["timing"])
        timing.update(timing_summary(per_step, global_batch))
        timing["rows_per_s"] = timing["samples_per_s"] * noise_multiplicity if timing["samples_per_s"] else None
        timing["step_time_reduction"] = "per step, the max over ranks of each rank's own step time"
        timing["rank0_step_times_ms"] = step_ms
        peaks = [r["total_bytes"] for r in every]
        known = [p for p in peaks if p is not None]
        block = {
            "world_size": self.world_size,
            "backend": self.backend,
            "fsdp2_sharded": self.sharded,
            "per_gpu_batch_size": per_rank_batch,
            "global_batch_size": global_batch,
            "per_rank_peak_allocated_bytes": [r["peak_allocated_bytes"] for r in every],
            "per_rank_peak_bytes": peaks,
            "peak_bytes_max": max(known) if known else None,
            "peak_bytes_mean": sum(known) / len(known) if known else None,
            "peak_source": mem["breakdown"]["total_source"],
            "per_rank_median_step_ms": [_median(r["step_ms"]) for r in every],
            "global_samples_per_s": timing["samples_per_s"],
            "per_rank_final_mean_loss": [r["loss"] for r in every],
        }
        out = dict(result, timing=timing, distributed=block, avg_time_ms=timing["mean_ms"])
        if block["peak_bytes_max"] is not None:  # legacy MiB: the largest rank (memory.* is rank 0's)
            out["peak_memory_mb"] = block["peak_bytes_max"] / 2**20
        return out


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def run_worker(config: dict, device, report) -> int:
    """One torchrun rank: measure (FSDP2), rank 0 writes the record; a failed rank writes its own for the parent."""
    import warnings

    import torch
    import torch.distributed as dist

    from memory_test.diffusion_profile import single_experiment as se
    from memory_test.diffusion_profile.experiments import resolve_experiment

    # The DiT wrapper returns a slice of diffusers' output; the step never modifies it in place, so FSDP2's
    # pre-backward hook on that view is safe.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    exp = resolve_experiment(config["experiment"])
    ctx = WorkerContext(device, sharded=exp.distributed or exp.name in FSDP_BASELINES)
    if ctx.world_size != config["nproc_per_node"]:
        print(f"error: torchrun started {ctx.world_size} processes, --nproc-per-node says {config['nproc_per_node']}",
              file=sys.stderr)  # fmt: skip
        return records.EXIT_USAGE
    if ctx.rank != 0:
        config = dict(config, memory_snapshot=None)  # one allocator snapshot: rank 0's
    rec, code = se.run_and_record(config, device, dist=ctx)
    if rec["status"] == "ok":
        if ctx.rank == 0:
            records.write_record_atomic(config["output"], rec)
            report(rec, config)
        dist.barrier()  # leave together: a rank tearing down gloo while its peer still uses it aborts
        dist.destroy_process_group()
        return code
    rec["distributed"] = {"world_size": ctx.world_size, "backend": ctx.backend, "failed_rank": ctx.rank}
    rank_dir = os.environ.get(RANK_DIR_ENV)
    if rank_dir:
        records.write_record_atomic(Path(rank_dir) / f"rank{ctx.rank}.json", rec)
    elif ctx.rank == 0:  # torchrun started by hand: no parent to collect, rank 0 records its own failure
        records.write_record_atomic(config["output"], rec)
    print(f"rank {ctx.rank}: {rec['status'].upper()}: {rec['message']}", file=sys.stderr, flush=True)
    return code


# ----- parent side --------------------------------------------------------------------------------------------


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "memory_test.diffusion_profile.single_experiment", *argv]  # fmt: skip


def launch(argv: list[str], config: dict, device, report) -> int:
    """Run torchrun on ``argv`` (the same flags: workers see LOCAL_RANK) and make sure one record results."""
    from memory_test.diffusion_profile import single_experiment as se

    nproc = config["nproc_per_node"]
    out = Path(config["output"])
    rank_dir = out.parent / f".{out.name}.ranks"
    shutil.rmtree(rank_dir, ignore_errors=True)
    rank_dir.mkdir(parents=True)
    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    env[RANK_DIR_ENV] = str(rank_dir)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    started = time.time_ns()
    print(f"launching torchrun: {nproc} processes ({config['device']})", file=sys.stderr, flush=True)
    proc = subprocess.Popen(torchrun_command(nproc, argv), env=env, start_new_session=True)
    try:
        rc = proc.wait()
    except BaseException:  # Ctrl-C / SIGTERM: stop torchrun and every worker (its own process group)
        _stop_group(proc)
        shutil.rmtree(rank_dir, ignore_errors=True)
        raise
    failed = []
    for path in sorted(rank_dir.glob("rank*.json")):
        rec, _ = records.load_record(path)
        if rec is not None:
            failed.append(rec)
    shutil.rmtree(rank_dir, ignore_errors=True)
    fresh = out.exists() and out.stat().st_mtime_ns >= started
    rec, _ = records.load_record(out) if fresh else (None, None)
    if rec is not None and rec["status"] == "ok" and not failed:
        return records.EXIT_OK
    if failed:
        failed.sort(key=lambda r: (r["status"] != "oom", r["distributed"]["failed_rank"]))
        rec = failed[0]
        ranks = [r["distributed"]["failed_rank"] for r in failed]
        rec["message"] = f"rank {rec['distributed']['failed_rank']} of {nproc}: {rec['message']}"
        rec["distributed"] = {"world_size": nproc, "backend": rec["distributed"]["backend"], "failed_ranks": ranks}
    else:
        rec = se.base_record(config, se._env(device))
        rec["status"], rec["exit_code"] = "error", records.EXIT_ERROR
        rec["message"] = f"torchrun exited with code {rc} and no rank wrote a result (see its output above)"
        rec["distributed"] = {"world_size": nproc, "failed_ranks": None}
    records.write_record_atomic(out, rec)
    report(rec, config)
    return rec["exit_code"]


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def describe(rec: dict) -> str:
    """One line about the distributed part of a record, for the console summary."""
    block = rec.get("distributed") or {}
    if block.get("peak_bytes_max") is None:
        return ""
    return (
        f" | {block['world_size']} ranks ({block['backend']}), global batch {block['global_batch_size']}, "
        f"peak max {block['peak_bytes_max'] / 2**20:.1f} MiB mean {block['peak_bytes_mean'] / 2**20:.1f} MiB, "
        f"{block['global_samples_per_s']:.1f} samples/s"
    )
