"""Which experiments may run on how many processes, and on which devices (checked before anything runs)."""

from __future__ import annotations

import os

from memory_test.cli_common.errors import ToolError

# Single-GPU experiments that run as plain data-parallel FSDP2 baselines with N > 1 (no per-sample clipping).
FSDP_BASELINES = ("vanilla",)


def is_worker() -> bool:
    """True inside a torchrun worker (single_experiment then runs one rank instead of launching)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_request(exp, nproc: int) -> None:
    """ToolError unless ``exp`` may run on ``nproc`` processes (never a silent single-GPU run under a sharded name,
    never unsynchronised per-rank clipping)."""
    from memory_test.diffusion_profile.suite.experiments import sharded_experiments, single_device_experiments

    if exp.distributed and nproc < 2:
        raise ToolError(
            f"--experiment {exp.name} shards the model over processes (FSDP2) and needs --nproc-per-node N >= 2 "
            f"(got {nproc}); one process would be a single-GPU run under a sharded name",
            "single-GPU experiments: " + ", ".join(single_device_experiments()),
        )
    if nproc > 1 and not exp.distributed and exp.name not in FSDP_BASELINES:
        raise ToolError(
            f"--experiment {exp.name} with --nproc-per-node {nproc}: not supported sharded (each rank would clip "
            "and noise its own samples unsynchronised)",
            f"use a sharded DP mode ({', '.join(sharded_experiments())}), or {'/'.join(FSDP_BASELINES)} as the "
            "FSDP2 baseline, or --nproc-per-node 1",
        )


def check_device(device, device_arg: str, nproc: int) -> None:
    """N processes on CUDA need N visible GPUs and no fixed --device cuda:K (each rank takes cuda:LOCAL_RANK)."""
    import torch

    if nproc < 2 or device.type != "cuda":
        return
    if device.index is not None:
        raise ToolError(
            f"--device {device_arg} with --nproc-per-node {nproc}: rank r uses cuda:r",
            "pass --device cuda (choose GPUs with CUDA_VISIBLE_DEVICES)",
        )
    count = torch.cuda.device_count()
    if nproc > count:
        raise ToolError(
            f"--nproc-per-node {nproc}: only {count} GPU(s) visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
            f"use --nproc-per-node <= {count}",
        )


def worker_device(requested):
    """This rank's device: cuda:LOCAL_RANK when the run is on CUDA, else cpu."""
    import torch

    if requested.type != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
