"""On a GPU: DiT-XL/2 under torch.compile, vanilla and DP: compiled update vs upstream hooks; eager vs compiled times.

    python scripts/compile_check.py --out-dir $OUT          # about 8 minutes on one H200: both parts
    python scripts/compile_check.py --out-dir $OUT --parts exact --exact-modes ghost,bookkeeping,flash_clip,flash_bk
    python scripts/compile_check.py --out-dir /tmp/cc --model DiT-tiny --device cpu --batch-sizes 4,2 --steps 2

Part "exact": B=8, fp32 without TF32, noise 0, SGD lr=1, C = the median per-sample norm (some samples clipped). The
update of one step of upstream ``hooks`` (eager) against one *compiled* step of each --exact-modes model (regional
Inductor compile; the steps before it, with lr=0, are the eager shape pass and the compiling step). Required:
relative error <= 1e-5 (the eager engine's is ~4e-7).
Part "time": for each precision (bf16 autocast; fp32 with TF32) and experiment (vanilla, flash_clip_bk), eager and
compiled (regional, --compile-mode) at B = 128, 32, 8, in one process, AdamW: warm-up runs until a step compiles
nothing (and at least --warmup steps), then --steps timed steps (CUDA events, median); compile seconds (wall time of
the warm-up steps that compiled, minus an ordinary step each), graphs, graph breaks and recompiles, the attention
kernel, and the peak allocated memory. Batch sizes run largest first: B=128 compiles a static graph, B=32 recompiles
with a dynamic batch dimension (automatic dynamic shapes), B=8 reuses it, as Poisson batches would. --variants
compiled skips the eager runs; --programs on,off times each compiled DP mode with its post-backward programs
(``memory_test.privacy.post_programs``) and without them (shown as "<mode> (programs off)").
Writes $OUT/compile_check.json after every configuration (an interrupted call keeps what finished).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from memory_test.cli_common.arg_types import non_negative_int, positive_int  # noqa: E402
from memory_test.cli_common.devices import resolve_device  # noqa: E402
from memory_test.cli_common.errors import run_tool  # noqa: E402
from memory_test.models.dit_huggingface_wrapper import DiTHuggingFaceWrapper  # noqa: E402
from memory_test.privacy import PrivacyEngine  # noqa: E402
from memory_test.privacy.compiled import compile_regions  # noqa: E402
from memory_test.profiling.compile_stats import compile_stats  # noqa: E402
from memory_test.profiling.environment import environment  # noqa: E402
from memory_test.profiling.tracker import StepTimer  # noqa: E402

REQUIRED_REL_ERR = 1e-5
# --model DiT-tiny --device cpu: a smoke test of this script on a machine without a GPU (numbers meaningless).
MODEL, DEVICE = "DiT-XL/2", torch.device("cuda")


def per_sample_mse(pred, target):
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


per_sample_mse.reduction = "mean"


def build_model(seed: int = 0) -> DiTHuggingFaceWrapper:
    with torch.device(DEVICE):
        model = DiTHuggingFaceWrapper(MODEL, use_flash_attention=True, class_dropout_prob=0.0).train()
    torch.manual_seed(seed)
    with torch.no_grad():  # diffusers zero-inits adaLN and proj_out like DiT: random weights exercise every path
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def make_batch(n: int, side: int, classes: int, seed: int = 1):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (
        torch.randn(n, 4, side, side, device=DEVICE, generator=gen),
        torch.randint(0, 1000, (n,), device=DEVICE, generator=gen),
        torch.randint(0, classes, (n,), device=DEVICE, generator=gen),
        torch.randn(n, 4, side, side, device=DEVICE, generator=gen),
    )


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def make_private(model, mode, optimizer, n, max_grad_norm, noise_multiplier):
    return PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(torch.zeros(n)), batch_size=n),
        criterion=per_sample_mse,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        grad_sample_mode=mode,
        poisson_sampling=False,
    )


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ----- part "exact" ------------------------------------------------------------------------------------------
def clipping_bound(batch) -> float:
    model = build_model()
    dp, _, crit, _ = make_private(model, "ghost", torch.optim.SGD(model.parameters(), lr=0.0), len(batch[0]), 1.0, 0.0)
    crit(dp(*batch[:3]), batch[3]).backward()
    bound = dp.per_sample_gradient_norms.median().item()
    del dp, model
    empty_cache()
    return bound


def dp_update(mode: str, compiled: bool, batch, bound: float, compile_mode: str = "default"):
    """(the update of one DP step, facts): compiled after three lr=0 steps (the eager shape pass, the compiling step,
    and under reduce-overhead the step that records the CUDA graphs), so that the measured step replays them."""
    torch._dynamo.reset()
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp, dp_opt, crit, _ = make_private(model, mode, opt, len(batch[0]), bound, 0.0)
    info = {}
    if compiled:
        dp.compile(regional=True, fullgraph=True, **({} if compile_mode == "default" else {"mode": compile_mode}))
        before = compile_stats()
        for group in dp_opt.param_groups:
            group["lr"] = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            crit(dp(*batch[:3]), batch[3]).backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
            sync()
            info.setdefault("warmup_step_s", []).append(time.perf_counter() - t0)
        for group in dp_opt.param_groups:
            group["lr"] = 1.0
        info["compile"] = compile_stats().since(before).as_dict()
        info["post_programs"] = dp.post_programs_status
    start = flat_params(model)
    crit(dp(*batch[:3]), batch[3]).backward()
    dp_opt.step()
    update = start - flat_params(model)
    info["attention"] = model.attention_backend
    del start, dp, dp_opt, crit, model, opt
    empty_cache()
    return update, info


def part_exact(args, record, save):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    batch = make_batch(8, *args.latent)
    bound = clipping_bound(batch)
    reference, _ = dp_update("hooks", False, batch, bound)
    out = record["exact"] = {"batch_size": 8, "precision": "fp32, TF32 off", "reference": "hooks (eager)", "modes": {}}
    for mode in args.exact_modes.split(","):
        t0 = time.perf_counter()
        update, info = dp_update(mode, True, batch, bound, args.compile_mode)
        info["compile_mode"] = args.compile_mode
        info["rel_err_vs_hooks"] = ((update - reference).norm() / reference.norm()).item()
        info["ok"] = info["rel_err_vs_hooks"] <= REQUIRED_REL_ERR
        info["wall_s"] = time.perf_counter() - t0
        out["modes"][mode] = info
        print(f"exact {mode}: rel err vs hooks {info['rel_err_vs_hooks']:.2e} {info['compile']}", flush=True)
        del update
        save()


# ----- part "time" -------------------------------------------------------------------------------------------
def prepare(experiment: str, n: int):
    """(model to call, step(batch, amp), the wrapper model) for vanilla or a DP mode, AdamW, noise 1."""
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if experiment == "vanilla":

        def step(batch, amp):
            with amp:
                pred = model(*batch[:3])
            per_sample_mse(pred, batch[3]).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return model, step, model
    dp, dp_opt, crit, _ = make_private(model, experiment, opt, n, 1.0, 1.0)

    def dp_step(batch, amp):
        with amp:
            pred = dp(*batch[:3])
        crit(pred, batch[3]).backward()
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)

    return dp, dp_step, model


def timed(step, batch, amp, args) -> dict:
    """Warm up until a step compiles nothing, then time --steps steps; compile work is reported, never timed."""
    warm, first = [], compile_stats()
    for i in range(args.max_warmup):
        before = compile_stats()
        t0 = time.perf_counter()
        step(batch, amp)
        sync()
        compiled = compile_stats().since(before).graphs > 0
        warm.append((time.perf_counter() - t0, compiled))
        if i + 1 >= args.warmup and not compiled:
            break
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = compile_stats()
    timer = StepTimer(DEVICE)
    for _ in range(args.steps):
        with timer.step():
            step(batch, amp)
    times = timer.finish()
    median = statistics.median(times)
    compiling = [s for s, c in warm if c]
    return {
        "step_ms_median": median,
        "step_ms_all": times,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else None,
        "warmup_steps": len(warm),
        "compile_ms": max(0.0, sum(compiling) * 1e3 - len(compiling) * median),
        "compile": compile_stats().since(first).as_dict(),
        "compiled_during_timing": compile_stats().since(before).as_dict(),
    }


def variants(args, experiment: str) -> list[tuple[bool, bool]]:
    """(compiled, programs) pairs to time for one experiment: eager and/or compiled (--variants); a compiled DP mode
    once per --programs value (its post-backward programs on or off: ``dp_model.compile(programs=...)``)."""
    out = []
    for variant in args.variants.split(","):
        compiled = variant == "compiled"
        values = [v == "on" for v in args.programs.split(",")] if compiled and experiment != "vanilla" else [True]
        out += [(compiled, programs) for programs in values]
    return out


def label(experiment: str, compiled: bool, programs: bool) -> str:
    return experiment if programs or not compiled else f"{experiment} (programs off)"


def part_time(args, record, save, deadline):
    out = record.setdefault("time", [])
    for precision in args.precisions.split(","):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "fp32"
        amp = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        for experiment in args.experiments.split(","):
            for compiled, programs in variants(args, experiment):
                name = label(experiment, compiled, programs)
                if time.perf_counter() > deadline:
                    out.append({"precision": precision, "experiment": name, "compiled": compiled, "skipped": 1})
                    save()
                    continue
                time_one(args, out, save, precision, amp, experiment, compiled, programs)


def time_one(args, out, save, precision, amp, experiment, compiled, programs):
    """One model, eager or compiled, timed at every --batch-sizes (largest first)."""
    torch._dynamo.reset()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    target, step, wrapper = prepare(experiment, sizes[0])
    if compiled and experiment == "vanilla":
        compile_regions(target, regional=True, mode=args.compile_mode, fullgraph=True)
    elif compiled:  # the DP model's own compile(): compile_regions on it would trace the eager taps
        target.compile(regional=True, mode=args.compile_mode, fullgraph=True, programs=programs)
    for n in sizes:
        result = timed(step, make_batch(n, *args.latent), amp, args)
        result.update(
            precision=precision,
            experiment=label(experiment, compiled, programs),
            compiled=compiled,
            compile_mode=args.compile_mode if compiled else None,
            post_programs=getattr(target, "post_programs_status", None) if compiled else None,
            batch_size=n,
            attention=wrapper.attention_backend,
        )
        out.append(result)
        save()
        print(
            f"{precision} {result['experiment']} {'compiled' if compiled else 'eager'} B={n}: "
            f"{result['step_ms_median']:.1f} ms, compile {result['compile_ms'] / 1e3:.1f} s, "
            f"{result['compile']}",
            flush=True,
        )
    del target, step, wrapper
    empty_cache()


def main():
    global MODEL, DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--parts", default="exact,time")
    ap.add_argument("--exact-modes", default="flash_clip_bk,ghost")
    ap.add_argument("--experiments", default="vanilla,flash_clip_bk")
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--batch-sizes", default="128,32,8")
    ap.add_argument("--variants", default="eager,compiled", help="eager and/or compiled runs of each experiment")
    ap.add_argument("--programs", default="on", help="compiled DP: post-backward programs on, off, or on,off (both)")
    ap.add_argument("--compile-mode", default="default", choices=["default", "max-autotune", "reduce-overhead"])
    ap.add_argument("--warmup", type=non_negative_int, default=3)
    ap.add_argument("--max-warmup", type=non_negative_int, default=8)
    ap.add_argument("--steps", type=positive_int, default=10)
    ap.add_argument("--budget-s", type=float, default=510, help="configurations not started by then are skipped")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    MODEL, DEVICE = args.model, resolve_device(args.device)
    probe = DiTHuggingFaceWrapper(MODEL, use_flash_attention=False) if DEVICE.type == "cpu" else None
    args.latent = (32, 1000) if probe is None else (probe.sample_size, probe.num_classes)
    deadline = time.perf_counter() + args.budget_s
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "compile_check.json")
    record = {"what": __doc__.strip().splitlines()[0], "args": vars(args), "env": environment(DEVICE)}

    def save():
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=2, default=str)
        os.replace(path + ".tmp", path)

    parts = {"exact": lambda: part_exact(args, record, save), "time": lambda: part_time(args, record, save, deadline)}
    for name in args.parts.split(","):
        parts[name]()
    save()
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(run_tool(Path(__file__).name, main))
