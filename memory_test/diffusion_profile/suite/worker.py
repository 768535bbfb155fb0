"""One rank of a multi-process run (started by ``launch``): FSDP2, this rank's rows, results combined over ranks.

Every worker (``LOCAL_RANK`` set) initialises ``torch.distributed`` ("nccl" on CUDA with device ``cuda:LOCAL_RANK``,
"gloo" on CPU), builds the same seeded DiT, shards it with ``memory_test.privacy.fsdp.shard_dit`` and trains on its
own slice of a seeded global batch of N·B. Rank 0 writes the one record; a rank whose run fails writes its own
record into the folder the parent names (``RANK_DIR_ENV``) for the parent to report.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from memory_test.diffusion_profile.suite.distributed_rules import FSDP_BASELINES
from memory_test.diffusion_profile.suite.exit_codes import EXIT_USAGE
from memory_test.diffusion_profile.suite.measure import Measured
from memory_test.diffusion_profile.suite.run import report, run_and_record
from memory_test.records.io import write_record_atomic
from memory_test.records.ranks import RankResult, RunShape, combine
from memory_test.records.record import Distributed, RunConfig

RANK_DIR_ENV = "MEMORY_TEST_DIST_RANK_DIR"


class WorkerContext:
    """One rank's view: its rank, the world, and the hooks ``measure`` calls."""

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

    def combine(self, measured: Measured, config: RunConfig) -> Measured:
        """Every rank's step times and peaks (a collective: all ranks call it); global timing on top."""
        mine = RankResult(
            step_ms=measured.step_ms,
            peak_allocated_bytes=measured.memory.peak_allocated_bytes,
            total_bytes=measured.memory.total_bytes,
            final_mean_loss=measured.loss.final_mean_loss,
        )
        every: list = [None] * self.world_size
        self.dist.all_gather_object(every, dataclasses.asdict(mine))
        shape = RunShape(
            world_size=self.world_size,
            backend=self.backend,
            sharded=self.sharded,
            per_rank_batch=config.batch_size,
            noise_multiplicity=config.noise_multiplicity,
            peak_source=measured.memory.breakdown.total_source,
        )
        timing, block = combine([RankResult(**r) for r in every], measured.timing, shape)
        return dataclasses.replace(measured, timing=timing, distributed=block)


def run_worker(config: RunConfig, device) -> int:
    """One torchrun rank: measure (FSDP2); rank 0 writes the record, a failed rank its own for the parent."""
    import warnings

    import torch
    import torch.distributed as dist

    from memory_test.diffusion_profile.suite.experiments import resolve_experiment

    # The DiT wrapper returns a slice of diffusers' output; the step never modifies it in place, so FSDP2's
    # pre-backward hook on that view is safe.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    exp = resolve_experiment(config.experiment)
    ctx = WorkerContext(device, sharded=exp.distributed or exp.name in FSDP_BASELINES)
    if ctx.world_size != config.nproc_per_node:
        print(f"error: torchrun started {ctx.world_size} processes, --nproc-per-node says {config.nproc_per_node}",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if ctx.rank != 0:
        config = config.replace(memory_snapshot=None)  # one allocator snapshot: rank 0's
    rec, code = run_and_record(config, device, dist=ctx)
    if rec.status == "ok":
        if ctx.rank == 0:
            write_record_atomic(config.output, rec)
            report(rec)
        dist.barrier()  # leave together: a rank tearing down gloo while its peer still uses it aborts
        dist.destroy_process_group()
        return code
    rec = rec.replace(distributed=Distributed(world_size=ctx.world_size, backend=ctx.backend, failed_rank=ctx.rank))
    rank_dir = os.environ.get(RANK_DIR_ENV)
    if rank_dir:
        write_record_atomic(Path(rank_dir) / f"rank{ctx.rank}.json", rec)
    elif ctx.rank == 0:  # torchrun started by hand: no parent to collect, rank 0 records its own failure
        write_record_atomic(config.output, rec)
    print(f"rank {ctx.rank}: {rec.status.upper()}: {rec.message}", file=sys.stderr, flush=True)
    return code
