"""Multi-GPU check of a sharded DP mode (or plain FSDP2 'vanilla'): one step vs the single-process update; memory, time.

    torchrun --nproc-per-node 2 scripts/fsdp_check.py --model DiT-XL/2 --global-batch 16 \\
        --output results/fsdp_check_xl2_b16_w2.json

Every rank builds the same DiT (seeded) and the same global batch; rank 0 also computes the single-process
reference update on the whole batch (book-keeping, or the plain mean gradient for vanilla) before the sharded run.
The sharded run shards each block with FSDP2 (``shard_dit``), takes rank r's contiguous slice of the batch, and
steps SGD(lr=1) without noise; its update, gathered parameter by parameter, is compared on rank 0. Then a few
timed steps (lr=0) give the step time and each rank's peak memory. Runs on CPU with gloo for a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import DiTTransformer2DModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from memory_test.cli_common.arg_types import positive_int  # noqa: E402
from memory_test.cli_common.errors import run_tool  # noqa: E402
from memory_test.cli_common.files import atomic_write_json  # noqa: E402
from memory_test.models.dit_presets import build_dit_config  # noqa: E402
from memory_test.privacy import MODES, PrivacyEngine  # noqa: E402
from memory_test.privacy.fsdp import shard_dit  # noqa: E402
from memory_test.profiling.tracker import MemoryTracker, StepTimer  # noqa: E402


class DiT(nn.Module):
    """Stock diffusers DiT returning the epsilon channels; label dropout off so both runs see the same labels."""

    def __init__(self, config: dict):
        super().__init__()
        self.model = DiTTransformer2DModel(**config)
        self.in_channels = config["in_channels"]
        for blk in self.model.transformer_blocks:
            blk.norm1.emb.class_embedder.dropout_prob = 0.0

    def forward(self, x, t, y):
        return self.model(x, timestep=t, class_labels=y).sample[:, : self.in_channels]


def criterion(pred, target):
    return (pred - target).pow(2).flatten(1).mean(1)


criterion.reduction = "mean"


def make_batch(config: dict, n: int, device, dtype):
    gen = torch.Generator().manual_seed(1)
    shape = (n, config["in_channels"], config["sample_size"], config["sample_size"])
    x = torch.randn(shape, generator=gen, dtype=dtype)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, config["num_embeds_ada_norm"], (n,), generator=gen)
    target = torch.randn(shape, generator=gen, dtype=dtype)
    return [v.to(device) for v in (x, t, y, target)]


def dp_step(model, mode, batch, max_grad_norm, global_batch, lr=1.0):
    """make_private + one step; returns (dp_model, dp_optimizer, criterion) for further timed steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(torch.zeros(global_batch)), batch_size=global_batch)  # sampling rate 1
    dp_model, dp_opt, crit, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=criterion,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        grad_sample_mode=mode,
        poisson_sampling=False,
    )
    x, t, y, target = batch
    crit(dp_model(x, t, y), target).backward()
    dp_opt.step()
    dp_opt.zero_grad(set_to_none=True)
    return dp_model, dp_opt, crit


def vanilla_step(model, batch, lr=1.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    x, t, y, target = batch
    criterion(model(x, t, y), target).mean().backward()  # FSDP2 averages over ranks: the global mean
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def reference_update(base, args, batch, device):
    """Rank 0 only: the single-process update on the whole batch, on CPU to leave the GPU for the sharded run."""
    model = copy.deepcopy(base).to(device)
    before = [p.detach().cpu().clone() for p in model.parameters()]
    max_grad_norm = args.max_grad_norm
    if args.mode == "vanilla":
        vanilla_step(model, batch)
    else:
        if max_grad_norm is None:  # the median per-sample norm: some samples clipped, some not
            dp_model, _, _ = dp_step(copy.deepcopy(model), "bookkeeping", batch, 1e12, args.global_batch, lr=0.0)
            max_grad_norm = dp_model.per_sample_gradient_norms.median().item()
            del dp_model
        dp_step(model, "bookkeeping", batch, max_grad_norm, args.global_batch)
    update = [b - p.detach().cpu() for b, p in zip(before, model.parameters())]
    del model
    return update, max_grad_norm


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="DiT-tiny", help="a dit_presets name, e.g. DiT-XL/2")
    parser.add_argument(
        "--mode", default="ghost_fsdp_bk", choices=[n for n, m in MODES.items() if m.distributed] + ["vanilla"]
    )
    parser.add_argument("--global-batch", type=positive_int, default=8)
    parser.add_argument("--max-grad-norm", type=float, default=None, help="default: median per-sample norm")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps after the checked one")
    parser.add_argument("--tolerance", type=float, default=None, help="default 1e-4 (fp32), 1e-9 (fp64)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the world size {world}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    tolerance = args.tolerance or (1e-4 if dtype == torch.float32 else 1e-9)

    config = build_dit_config(args.model)
    torch.manual_seed(0)
    base = DiT(config).to(dtype).train()
    batch = make_batch(config, args.global_batch, device, dtype)

    # 1. Reference on rank 0, before the process group exists (the engine refuses a single-process mode inside a
    #    multi-process group: each rank would clip and noise on its own); every rank then uses its clipping bound.
    want, max_grad_norm = reference_update(base, args, batch, device) if rank == 0 else (None, None)
    if rank == 0 and use_cuda:
        torch.cuda.empty_cache()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    shared = [max_grad_norm]
    dist.broadcast_object_list(shared, src=0)
    max_grad_norm = shared[0]

    # 2. The sharded step on this rank's slice of the global batch.
    per_rank = args.global_batch // world
    local = [v[rank * per_rank : (rank + 1) * per_rank] for v in batch]
    model = shard_dit(copy.deepcopy(base).to(device))
    del base
    before = [p.detach().clone() for p in model.parameters()]
    tracker = MemoryTracker(device, sample=False)
    tracker.reset_peaks()
    if args.mode == "vanilla":
        optimizer = vanilla_step(model, local)
    else:
        dp_model, dp_opt, crit = dp_step(model, args.mode, local, max_grad_norm, args.global_batch)
    sq_err = sq_ref = 0.0
    for b, p in zip(before, model.parameters()):
        got = (b - p.detach()).full_tensor().cpu()  # a collective: every rank takes part
        if rank == 0:
            ref = want.pop(0)
            sq_err += (got.double() - ref.double()).pow(2).sum().item()
            sq_ref += ref.double().pow(2).sum().item()
    del before

    # 3. Timed steps with lr=0 (the weights stay put).
    groups = optimizer.param_groups if args.mode == "vanilla" else dp_opt.param_groups
    for group in groups:
        group["lr"] = 0.0
    timer = StepTimer(device)
    for _ in range(args.steps):
        dist.barrier()
        with timer.step():
            if args.mode == "vanilla":
                criterion(model(*local[:3]), local[3]).mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                crit(dp_model(*local[:3]), local[3]).backward()
                dp_opt.step()
                dp_opt.zero_grad(set_to_none=True)
    times = timer.finish()
    peak = tracker.peak_allocated_bytes()  # the allocator's peak: not measured on CPU
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    step_times = [None] * world
    dist.all_gather_object(step_times, statistics.median(times) if times else None)

    if rank == 0:
        rel_err = (sq_err / sq_ref) ** 0.5 if sq_ref > 0 else float("nan")
        step_ms = max(t for t in step_times if t is not None) if times else None
        record = {
            "model": args.model,
            "mode": args.mode,
            "world_size": world,
            "backend": dist.get_backend(),
            "dtype": args.dtype,
            "global_batch": args.global_batch,
            "max_grad_norm": max_grad_norm,
            "update_rel_err_vs_single_process": rel_err,
            "tolerance": tolerance,
            "ok": rel_err <= tolerance,
            "peak_allocated_bytes_per_rank": peaks,
            "peak_allocated_bytes_max": max(peaks) if use_cuda else None,
            "peak_allocated_bytes_mean": sum(peaks) / world if use_cuda else None,
            "step_ms_median": step_ms,
            "samples_per_s": args.global_batch / (step_ms / 1e3) if step_ms else None,
            "device": torch.cuda.get_device_name(device) if use_cuda else "cpu",
        }
        print(json.dumps(record, indent=1))
        if args.output:
            atomic_write_json(args.output, record, indent=1)
        if not record["ok"]:
            print(f"FAIL: sharded update differs from the single-process one by {rel_err:.2e}", file=sys.stderr)
    failed = rank == 0 and not record["ok"]
    dist.destroy_process_group()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(run_tool(Path(__file__).name, main))
