"""Host (Python + dispatch) time per training step of each mode, on a model with DiT-XL/2's layer structure.

    python scripts/host_overhead.py --modes vanilla,ghost,bookkeeping,flash_clip,flash_clip_bk [--profile flash_clip_bk]

The model has XL/2's 28 blocks (same modules, same hooks, same number of kernel launches per step) but a width of
16 and 16 tokens, and runs on the CPU, so that a step's wall time is almost all host work. On a GPU that host work
overlaps the kernels of the previous step only while the GPU is busier than the host: at small batches it is the
step time. --profile MODE prints cProfile's heaviest functions of that mode.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from memory_test.diffusion_profile.suite.experiments import EXPERIMENTS, RunContext  # noqa: E402
from memory_test.diffusion_profile.suite.train_step import make_train_step  # noqa: E402
from memory_test.models.dit_huggingface_wrapper import DiTHuggingFaceWrapper  # noqa: E402
from memory_test.models.dit_presets import DIT_MODELS, DiTPreset  # noqa: E402
from memory_test.profiling.tracker import StepTimer  # noqa: E402
from memory_test.records.timing import summarize  # noqa: E402

THIN_XL = DiTPreset(
    "DiT-XL-depth-thin", num_layers=DIT_MODELS["DiT-XL/2"].num_layers, num_attention_heads=2, attention_head_dim=8,
    sample_size=8, num_classes=10,
)  # fmt: skip


def measure(name: str, args, profile: bool) -> dict:
    torch.manual_seed(0)
    model = DiTHuggingFaceWrapper(model_name=THIN_XL, pretrained=False, use_flash_attention=False).train()
    ctx = RunContext(
        device=torch.device("cpu"), batch_size=args.batch_size, noise_multiplicity=1, noise_multiplier=1.0,
        max_grad_norm=1.0, optimizer="adamw", lr=1e-4, seed=0,
    )  # fmt: skip
    prepared = EXPERIMENTS[name].prepare(model, ctx)
    x0 = torch.randn(args.batch_size, 4, THIN_XL.sample_size, THIN_XL.sample_size)
    labels = torch.randint(0, THIN_XL.num_classes, (args.batch_size,))
    step = make_train_step(prepared, x0, labels, noise_multiplicity=1, autocast_dtype=None, seed=0)
    for _ in range(args.warmup):
        step()
    timer = StepTimer(torch.device("cpu"))
    for _ in range(args.steps):
        with timer.step():
            step()
    timing = summarize(timer.finish(), args.batch_size)
    out = {"median_ms": timing.median_ms, "p20_ms": timing.p20_ms}
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="vanilla,ghost,bookkeeping,flash_clip,flash_clip_bk")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--profile", default=None, help="mode to run under cProfile after timing")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no intra-op noise)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = None
    print(f"{'mode':<16} {'host ms/step':>12} {'x vanilla':>10}")
    for name in args.modes.split(","):
        r = measure(name, args, profile=name == args.profile)
        base = r["median_ms"] if name == "vanilla" else base
        ratio = f"{r['median_ms'] / base:10.2f}" if base else " " * 10
        print(f"{name:<16} {r['median_ms']:12.1f} {ratio}", flush=True)


if __name__ == "__main__":
    main()
