"""Host (Python + dispatch) time per training step of each mode, on a model with DiT-XL/2's layer structure.

    python scripts/host_overhead.py --modes vanilla,ghost,bookkeeping,flash_clip,flash_clip_bk [--profile flash_clip_bk]
    python scripts/host_overhead.py --compile --modes vanilla,flash_clip_bk,bookkeeping --phases

The model has XL/2's 28 blocks (same modules, same hooks, same number of kernel launches per step) but a width of
16 and 16 tokens, and runs on the CPU, so that a step's wall time is almost all host work. On a GPU that host work
overlaps the kernels of the previous step only while the GPU is busier than the host: at small batches it is the
step time. --profile MODE prints cProfile's heaviest functions of that mode.

--compile compiles the model as the GPU check does (regional Inductor: ``compile_regions`` for vanilla,
``dp_model.compile`` for DP modes; the first steps compile, on the CPU with gcc). AdamW runs its foreach
implementation, as it does by default on CUDA (on the CPU torch defaults to a per-parameter loop, which would add
~25 ms of host work to every mode that no GPU run pays). --phases splits each step into forward, recording backward
(norms included), clipped gradients, end of step, optimizer and zero_grad (20th percentiles, ms).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import os
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memory_test.cli_common.arg_types import names_from, non_negative_int, positive_int  # noqa: E402
from memory_test.cli_common.errors import run_tool  # noqa: E402
from memory_test.diffusion.objective import NoiseSchedule, make_noisy_batch  # noqa: E402
from memory_test.diffusion_profile.suite.experiments import EXPERIMENTS, RunContext  # noqa: E402
from memory_test.models.dit_huggingface_wrapper import DiTHuggingFaceWrapper  # noqa: E402
from memory_test.models.dit_presets import DIT_MODELS, DiTPreset  # noqa: E402
from memory_test.privacy import grad_sample_module  # noqa: E402
from memory_test.privacy.compiled import compile_regions  # noqa: E402

THIN_XL = DiTPreset(
    "DiT-XL-depth-thin", num_layers=DIT_MODELS["DiT-XL/2"].num_layers, num_attention_heads=2, attention_head_dim=8,
    sample_size=8, num_classes=10,
)  # fmt: skip


def thin_xl(args) -> DiTPreset:
    return dataclasses.replace(THIN_XL, sample_size=args.sample_size)


DP_PHASES = ("record_norms", "write_clipped_grads", "end_step")  # methods of the wrapped model timed by --phases


class PhaseTimer:
    """Wall time per named phase of the current step; ``steps`` keeps one dict per finished step."""

    def __init__(self):
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.current[name] += (time.perf_counter() - t0) * 1e3

    def wrap(self, obj, method: str) -> None:
        """Time every call of ``obj.method`` as the phase of that name (an instance attribute shadows the method)."""
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            with self.phase(method):
                return inner(*args, **kwargs)

        obj.__dict__[method] = timed

    def end_step(self, total_ms: float) -> None:
        self.current["step"] = total_ms
        self.steps.append(dict(self.current))
        self.current = defaultdict(float)

    def p20(self) -> dict[str, float]:
        names = {k for s in self.steps for k in s}
        return {k: sorted(s.get(k, 0.0) for s in self.steps)[len(self.steps) // 5] for k in sorted(names)}


def build(name: str, args):
    torch.manual_seed(0)
    grad_sample_module.STACK_BYTES = args.stack_bytes
    model = DiTHuggingFaceWrapper(model_name=thin_xl(args), pretrained=False, use_flash_attention=False).train()
    ctx = RunContext(
        device=torch.device("cpu"), batch_size=args.batch_size, noise_multiplicity=1, noise_multiplier=1.0,
        max_grad_norm=1.0, optimizer="adamw", lr=1e-4, seed=0,
    )  # fmt: skip
    prepared = EXPERIMENTS[name].prepare(model, ctx)
    for group in prepared.base_optimizer.param_groups:
        group["foreach"] = True  # CUDA's default (see the module doc)
    if args.compile:
        if name == "vanilla":
            compile_regions(prepared.model, regional=True, fullgraph=True)
        else:
            prepared.model.compile(regional=True, fullgraph=True, programs=args.programs == "on")
    return prepared


def make_step(prepared, args, timer: PhaseTimer):
    """The suite's training step (experiments.make_train_step) with a phase timer around each part."""
    x0 = torch.randn(args.batch_size, 4, args.sample_size, args.sample_size)
    labels = torch.randint(0, THIN_XL.num_classes, (args.batch_size,))
    gen = torch.Generator().manual_seed(2)
    schedule = NoiseSchedule()
    model, opt, loss_fn = prepared.model, prepared.optimizer, prepared.loss_fn
    if args.phases:
        for method in DP_PHASES:
            if hasattr(model, method):
                timer.wrap(model, method)

    def step():
        with timer.phase("batch"):
            x_t, t, y, eps = make_noisy_batch(x0, labels, 1, generator=gen, schedule=schedule)
        with timer.phase("forward"):
            pred = model(x_t, t, y)
        with timer.phase("backward"):
            loss_fn(pred, eps).backward()
        with timer.phase("optimizer"):
            opt.step()
        with timer.phase("zero_grad"):
            opt.zero_grad(set_to_none=True)

    return step


def measure(name: str, args, profile: bool) -> dict:
    prepared = build(name, args)
    timer = PhaseTimer()
    step = make_step(prepared, args, timer)
    for _ in range(args.warmup):
        step()
    timer.steps.clear()
    timer.current.clear()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
        timer.end_step(times[-1])
    out = {"median_ms": statistics.median(times), "p20_ms": sorted(times)[len(times) // 5], "phases": timer.p20()}
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
    ap.add_argument("--modes", default="vanilla,ghost,bookkeeping,flash_clip,flash_clip_bk",
                    type=names_from(EXPERIMENTS, "mode"))  # fmt: skip
    ap.add_argument("--batch-size", type=positive_int, default=2)
    ap.add_argument(
        "--sample-size", type=positive_int, default=THIN_XL.sample_size, help="latent side (tokens: (side/2)²)"
    )
    ap.add_argument(
        "--stack-bytes", type=int, default=grad_sample_module.STACK_BYTES,
        help="the engine's stacking budget; --sample-size 16 --stack-bytes 65536 stacks what XL/2 stacks at B>=8 "
        "(its one-row layers only): at the default the thin layers are so small that all 28 of a kind stack",
    )  # fmt: skip
    ap.add_argument("--warmup", type=non_negative_int, default=3)
    ap.add_argument("--steps", type=positive_int, default=15)
    ap.add_argument("--compile", action="store_true", help="regional Inductor compile (vanilla and DP alike)")
    ap.add_argument("--programs", choices=["on", "off"], default="on", help="compiled post-backward programs (DP)")
    ap.add_argument("--phases", action="store_true", help="print each mode's phase split (20th percentiles)")
    ap.add_argument("--profile", default=None, help="mode to run under cProfile after timing")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (1: no intra-op noise)")
    args = ap.parse_args()
    if args.compile:
        args.warmup = max(args.warmup, 4)  # the eager shape pass, the static compile, steady steps
    torch.set_num_threads(args.threads)
    base = None
    print(f"{'mode':<16} {'host ms/step':>12} {'p20':>7} {'x vanilla':>10}")
    for name in args.modes:
        r = measure(name, args, profile=name == args.profile)
        base = r["median_ms"] if name == "vanilla" else base
        ratio = f"{r['median_ms'] / base:10.2f}" if base else " " * 10
        print(f"{name:<16} {r['median_ms']:12.1f} {r['p20_ms']:7.1f} {ratio}", flush=True)
        if args.phases:
            print("    " + "  ".join(f"{k} {v:.1f}" for k, v in r["phases"].items()), flush=True)


if __name__ == "__main__":
    sys.exit(run_tool(Path(__file__).name, main))
