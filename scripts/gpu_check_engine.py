"""On a GPU: one DP step of every mode on real DiT-XL/2; each update vs upstream 'hooks'; step time and peak memory.

python scripts/gpu_check_engine.py --batch-size 8 --output results/engine_check_xl2_b8.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from memory_test.cli_common.arg_types import positive_int  # noqa: E402
from memory_test.cli_common.devices import require_cuda  # noqa: E402
from memory_test.cli_common.errors import run_tool  # noqa: E402
from memory_test.cli_common.files import atomic_write_json  # noqa: E402
from memory_test.models.dit_presets import build_dit_config  # noqa: E402
from memory_test.privacy import MODES, DPGradSampleModule, PrivacyEngine  # noqa: E402
from memory_test.profiling.tracker import MemoryTracker, StepTimer  # noqa: E402


class DiT(nn.Module):
    """Stock diffusers DiT-XL/2 returning the epsilon channels; label dropout off so every mode sees one forward."""

    def __init__(self):
        super().__init__()
        self.model = DiTTransformer2DModel(**build_dit_config("DiT-XL/2"))
        for blk in self.model.transformer_blocks:
            blk.norm1.emb.class_embedder.dropout_prob = 0.0

    def forward(self, x, t, y):
        return self.model(x, timestep=t, class_labels=y).sample[:, :4]


def criterion(pred, target):
    return (pred - target).pow(2).flatten(1).mean(1)


criterion.reduction = "mean"


def one_mode(base, mode, batch, max_grad_norm, steps):
    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(torch.zeros(len(batch[0]))), batch_size=len(batch[0]))
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
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    tracker = MemoryTracker(torch.device("cuda"), sample=False)
    tracker.reset_peaks()
    crit(dp_model(x, t, y), target).backward()
    dp_opt.step()
    dp_opt.zero_grad(set_to_none=True)
    peak = tracker.peak_allocated_bytes()
    update = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    del before
    for p_group in dp_opt.param_groups:
        p_group["lr"] = 0.0  # timing steps leave the weights alone
    timer = StepTimer(torch.device("cuda"))
    for _ in range(steps):
        with timer.step():
            crit(dp_model(x, t, y), target).backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
    times = timer.finish()
    # upstream hooks computes its per-sample gradients in torch; the engine says which kernels it ran
    backend = dp_model.stats().kernel_backend if isinstance(dp_model, DPGradSampleModule) else "torch"
    del dp_model, dp_opt, model
    torch.cuda.empty_cache()
    return update, {
        "peak_allocated_bytes": peak,
        "step_ms_median": statistics.median(times[1:]),
        "step_ms_all": times,
        "kernel_backend": backend,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--steps", type=positive_int, default=4)
    ap.add_argument("--modes", default=",".join(["hooks", *(n for n, m in MODES.items() if not m.distributed)]))
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    require_cuda(Path(__file__).name)
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 for the comparison
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    base = DiT().cuda().train()
    with torch.no_grad():  # diffusers zero-inits adaLN/proj_out like DiT: random weights exercise every path
        for p in base.parameters():
            p.normal_(0, 0.02)
    n = args.batch_size
    gen = torch.Generator(device="cuda").manual_seed(1)
    batch = (
        torch.randn(n, 4, 32, 32, device="cuda", generator=gen),
        torch.randint(0, 1000, (n,), device="cuda", generator=gen),
        torch.randint(0, 1000, (n,), device="cuda", generator=gen),
        torch.randn(n, 4, 32, 32, device="cuda", generator=gen),
    )
    # C = median per-sample norm, so that some samples are clipped and some are not.
    probe = copy.deepcopy(base)
    loader = DataLoader(TensorDataset(torch.zeros(n)), batch_size=n)
    pm, _, pc, _ = PrivacyEngine().make_private(
        module=probe,
        optimizer=torch.optim.SGD(probe.parameters(), lr=0.0),
        data_loader=loader,
        criterion=criterion,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
        poisson_sampling=False,
    )
    pc(pm(*batch[:3]), batch[3]).backward()
    max_grad_norm = pm.per_sample_gradient_norms.median().item()
    del pm, pc, probe
    torch.cuda.empty_cache()

    modes = args.modes.split(",")
    results, reference = {}, None
    for mode in modes:
        t0 = time.time()
        update, stats = one_mode(base, mode, batch, max_grad_norm, args.steps)
        if reference is None:
            reference = update
        stats["rel_err_vs_" + modes[0]] = ((update - reference).norm() / reference.norm()).item()
        stats["wall_s"] = time.time() - t0
        results[mode] = stats
        print(mode, {k: v for k, v in stats.items() if k != "step_ms_all"}, flush=True)
        del update
    record = {
        "what": "one DP-SGD step (SGD lr=1, noise 0) on stock diffusers DiT-XL/2-256, fp32 without TF32",
        "batch_size": n,
        "clipped_fraction_design": "C = median per-sample norm",
        "reference_mode": modes[0],
        "env": {
            "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "modes": results,
    }
    atomic_write_json(args.output, record, indent=2)
    print(f"{'mode':14s} {'rel_err':>10s} {'step ms':>9s} {'peak GiB':>9s}")
    for mode, s in results.items():
        print(
            f"{mode:14s} {s['rel_err_vs_' + modes[0]]:10.2e} {s['step_ms_median']:9.1f} "
            f"{s['peak_allocated_bytes'] / 2**30:9.2f}"
        )


if __name__ == "__main__":
    sys.exit(run_tool(Path(__file__).name, main))
