"""Flash per-sample Linear norms vs Opacus' einsum on DiT-XL/2 shapes: time, extra memory, TFLOP/s, error.

On one H200 (about 3 minutes; --quick drops T = 4096):
    python scripts/bench_flash_norms.py --output results/flash_norms_h200.json --markdown results/flash_norms_h200.md
CPU smoke test of the whole script (torch backend, tiny shapes, seconds):
    python scripts/bench_flash_norms.py --device cpu --output /tmp/flash.json --markdown /tmp/flash.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from memory_test.cli_common.errors import run_tool  # noqa: E402
from memory_test.cli_common.files import atomic_write_json, atomic_write_text  # noqa: E402
from memory_test.kernels import flash_norms_tuning  # noqa: E402
from memory_test.kernels.flash_norms import (  # noqa: E402
    choose_path,
    kernel_backend,
    linear_sq_norm_bounds,
    linear_sq_norms,
    multi_linear_sq_norms,
    tf32_rounding,
)
from memory_test.kernels.flash_norms_reference import (  # noqa: E402
    linear_sq_norms_reference,
    opacus_einsum_sq_norms,
)
from memory_test.kernels.norm_error import coherent_factor  # noqa: E402
from memory_test.profiling.tracker import StepTimer, extra_peak_bytes  # noqa: E402

# DiT-XL/2 Linear layers: attention projections and out, MLP fc1, adaLN (as if it had rows), MLP fc2.
GPU_SHAPES = [(1152, 1152), (1152, 4608), (1152, 6912), (4608, 1152)]
CPU_SHAPES = [(8, 8), (8, 24), (24, 8)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ("gram", "direct", "opacus")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """GPU, library versions, git commit and UTC time: enough to tell whether two records are comparable."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = {
        "utc_time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "opacus": _version("opacus"),
        "cuda": torch.version.cuda,
        "git_sha": sha or None,
        "kernel_backend": kernel_backend(device),
        "autotune": flash_norms_tuning.tuning_enabled(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "gpu_name": props.name,
            "gpu_memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
        }
    return env


class Timer:
    """Median milliseconds of a call: triton.testing.do_bench on CUDA (after its warm-up; it flushes the L2 cache
    between calls, which a kernel microbenchmark needs), the suite's StepTimer on CPU."""

    def __init__(self, device: torch.device, warmup_ms: int, rep_ms: int):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms

    def ms(self, fn) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        fn()
        timer = StepTimer(self.device)
        for _ in range(5):
            with timer.step():
                fn()
        return statistics.median(timer.finish())

    def extra_peak_bytes(self, fn) -> int | None:
        """Peak allocated during one call minus what was allocated before it (inputs): the method's own memory."""
        return extra_peak_bytes(fn, self.device)


def ceilings(timer: Timer, device: torch.device, n: int) -> dict:
    """Measured dense matmul TFLOP/s in bf16 and in fp32 with TF32: the roofs the kernels are compared with."""
    out = {}
    for name, dtype in DTYPES.items():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out[name] = 2 * n**3 / (timer.ms(lambda a=a, b=b: a @ b) * 1e-3) / 1e12
        del a, b
    return out


def flops_per_sample(method: str, T: int, d: int, p: int) -> int:
    """Gram: the upper triangle of two symmetric T x T Grams; direct: A_iᵀG_i; Opacus: full Grams, G's twice."""
    if method == "gram":
        return T * (T + 1) * (d + p)
    if method == "direct":
        return 2 * T * d * p
    return 2 * T * T * (d + 2 * p)


def _rel_err(got: tuple, ref: tuple) -> float:
    """Largest per-sample relative error over the weight and bias squared norms, against float64."""
    return max(float(((g.double() - r).abs() / r.abs().clamp_min(1e-300)).max()) for g, r in zip(got, ref))


def _excess(got: tuple, ref: tuple) -> dict:
    """Signed (bound - exact) / exact over samples, weight and bias squared norms: min < 0 would be a broken bound."""
    rel = torch.cat([((g.double() - r) / r.abs().clamp_min(1e-300)).flatten() for g, r in zip(got, ref)])
    return {"min": float(rel.min()), "max": float(rel.max())}


def run_case(timer, device, dtype_name, B, T, d, p, allow_tf32) -> dict:
    """One (dtype, T, d, p): every method's time, extra memory, TFLOP/s and error against the float64 reference."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(T * 7 + d + p)
    A = torch.randn(B, T, d, device=device, dtype=dtype, generator=gen)
    G = torch.randn(B, T, p, device=device, dtype=dtype, generator=gen)
    auto = choose_path(T, d, p, dtype)
    ref_path = "direct" if auto == "direct" else "gram"  # the cheaper exact formula
    ref = linear_sq_norms_reference(A, G, with_bias=True, path=ref_path, dtype=torch.float64)
    backend = kernel_backend(device)

    def flash(path):
        return lambda: linear_sq_norms(A, G, with_bias=True, path=path, backend=backend, allow_tf32=allow_tf32)[:2]

    def bound():  # the engine's call (auto path, the margin's u·D added), times k(u): the full bound (norm_error)
        w, b, _, budget = linear_sq_norm_bounds(A, G, with_bias=True, backend=backend, allow_tf32=allow_tf32)
        return w * coherent_factor(budget.u_w), b * coherent_factor(budget.u_b)

    calls = {"gram": flash("gram"), "direct": flash("direct"), "opacus": lambda: opacus_einsum_sq_norms(A, G, True)}
    calls["bound"] = bound
    row = {"dtype": dtype_name, "B": B, "T": T, "d": d, "p": p, "auto_path": auto, "backend": backend}
    row |= {"ms": {}, "extra_peak_bytes": {}, "tflops": {}, "max_rel_err": {}, "errors": {}}
    for method, call in calls.items():
        try:
            got = call()  # first call also compiles and tunes
            row["max_rel_err"][method] = _rel_err(got, ref)
            if method == "bound":
                row["bound_excess"] = _excess(got, ref)
            row["extra_peak_bytes"][method] = timer.extra_peak_bytes(call)
            row["ms"][method] = timer.ms(call)
            flops = B * flops_per_sample(auto if method == "bound" else method, T, d, p)
            row["tflops"][method] = flops / (row["ms"][method] * 1e-3) / 1e12
        except torch.cuda.OutOfMemoryError:
            row["errors"][method] = "oom"
        except Exception as e:  # keep the other measurements; main() exits non-zero if a flash kernel failed
            row["errors"][method] = f"{type(e).__name__}: {e}"[:500]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return fill_auto(row)


def fill_auto(row: dict) -> dict:
    """ "auto" runs exactly the chosen path's launcher, so its measurement is that path's (re-derivable offline)."""
    auto = row["auto_path"] = choose_path(row["T"], row["d"], row["p"], DTYPES[row["dtype"]])
    for key in ("ms", "extra_peak_bytes", "tflops", "max_rel_err"):
        row[key].pop("auto", None)
        if auto in row[key]:
            row[key]["auto"] = row[key][auto]
    if "auto" in row["ms"] and "opacus" in row["ms"]:
        row["speedup_vs_opacus"] = row["ms"]["opacus"] / row["ms"]["auto"]
    return row


def run_shared_case(timer, device, dtype_name, B, T, d, allow_tf32) -> dict:
    """q, k, v projections of one input: the shared-input Gram launch vs three single launches vs Opacus."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(T + d)
    A = torch.randn(B, T, d, device=device, dtype=dtype, generator=gen)
    Gs = [torch.randn(B, T, d, device=device, dtype=dtype, generator=gen) for _ in range(3)]
    backend = kernel_backend(device)
    kw = dict(path="gram", backend=backend, allow_tf32=allow_tf32)
    calls = {
        "shared": lambda: multi_linear_sq_norms(A, Gs, with_bias=[True] * 3, **kw),
        "separate": lambda: [linear_sq_norms(A, G, with_bias=True, **kw) for G in Gs],
        "opacus": lambda: [opacus_einsum_sq_norms(A, G, True) for G in Gs],
    }
    ref = [linear_sq_norms_reference(A, G, with_bias=True, dtype=torch.float64) for G in Gs]
    row = {"dtype": dtype_name, "B": B, "T": T, "d": d, "p": d, "n_outputs": 3, "ms": {}, "max_rel_err": {}}
    row["errors"] = {}
    for name, call in calls.items():
        try:
            row["max_rel_err"][name] = max(_rel_err(o[:2], r) for o, r in zip(call(), ref))
            row["ms"][name] = timer.ms(call)
        except Exception as e:  # recorded; main() exits non-zero if a flash launch failed
            row["errors"][name] = (
                "oom" if isinstance(e, torch.cuda.OutOfMemoryError) else f"{type(e).__name__}: {e}"[:500]
            )
    return row


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def _bound_cell(excess: dict | None) -> str:
    return "-" if excess is None else f"{excess['min']:+.1e} / {excess['max']:+.1e}"


def markdown(record: dict) -> str:
    """One line per (dtype, d->p, T): times, speed-up, extra memory, TFLOP/s vs ceiling, errors."""
    ceil = record["ceilings_tflops"]
    head = (
        "| dtype | d→p | T | auto | gram ms | direct ms | opacus ms | auto vs opacus | auto extra MB | opacus extra MB "
        "| auto TFLOP/s (% roof) | auto rel err | opacus rel err | bound ms | bound excess min / max |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in record["rows"]:
        ms, mem, err = r["ms"], r["extra_peak_bytes"], r["max_rel_err"]

        def cell(method, ms=ms, r=r):
            if method in r["errors"]:
                return "oom" if r["errors"][method] == "oom" else "error"
            return _fmt(ms.get(method), ".3f")

        mb = {k: (v / 2**20 if v is not None else None) for k, v in mem.items()}
        tf = r["tflops"].get("auto")
        roof = f"{_fmt(tf, '.3g')} ({_fmt(tf / ceil[r['dtype']] * 100 if tf else None, '.0f')}%)"
        lines.append(
            f"| {r['dtype']} | {r['d']}→{r['p']} | {r['T']} | {r['auto_path']} | {cell('gram')} | {cell('direct')} "
            f"| {cell('opacus')} | {_fmt(r.get('speedup_vs_opacus'), '.2f')}× | {_fmt(mb.get('auto'), '.1f')} "
            f"| {_fmt(mb.get('opacus'), '.0f')} | {roof} | {_fmt(err.get('auto'), '.1e')} "
            f"| {_fmt(err.get('opacus'), '.1e')} | {cell('bound')} | {_bound_cell(r.get('bound_excess'))} |"
        )
    lines += [
        "",
        "| shared input (q, k, v) | T | shared ms | 3 separate ms | 3 opacus ms | rel err |",
        "|---" * 6 + "|",
    ]
    for r in record.get("shared_input", []):
        ms = r["ms"]
        lines.append(
            f"| {r['dtype']} {r['d']}→3×{r['p']} | {r['T']} | {_fmt(ms.get('shared'), '.3f', 'error')} "
            f"| {_fmt(ms.get('separate'), '.3f', 'error')} | {_fmt(ms.get('opacus'), '.3f', 'error')} "
            f"| {_fmt(r['max_rel_err'].get('shared'), '.1e')} |"
        )
    roofs = ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in ceil.items())
    env = record["env"]
    title = f"Flash norms, B={record['config']['batch_size']}, {env.get('gpu_name', env['device_type'])} ({roofs})"
    return "\n".join([title, "", *lines])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--output", required=True, help="JSON record (bytes, ms)")
    ap.add_argument("--markdown", required=True, help="markdown table, also printed last")
    ap.add_argument("--quick", action="store_true", help="T in {256, 1024} only")
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 on CUDA, 2 on CPU")
    ap.add_argument("--seq", type=int, nargs="+", default=None, help="rows per sample T")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--rep-ms", type=int, default=40, help="do_bench repetition time per measurement")
    ap.add_argument("--no-tf32", action="store_true", help="fp32 in full precision (Triton FMA dot vs cuBLAS SGEMM)")
    ap.add_argument(
        "--rerender",
        metavar="JSON",
        help="no measuring: redo the auto column of a record with the current path rule and write --output/--markdown",
    )
    args = ap.parse_args(argv)
    if args.rerender:
        with open(args.rerender) as f:
            record = json.load(f)
        record["rows"] = [fill_auto(row) for row in record["rows"]]
        record["auto_rule"] = "re-derived offline from the measured gram/direct columns (bench --rerender)"
        return _write(record, args)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device; use --device cpu for the smoke test")
    gpu = device.type == "cuda"
    B = args.batch_size or (128 if gpu else 2)
    seqs = args.seq or (([256, 1024] if args.quick else [256, 1024, 4096]) if gpu else [4, 16])
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    timer = Timer(device, warmup_ms=10, rep_ms=args.rep_ms)
    # "fp32 (TF32)": the kernels get allow_tf32=True and Opacus' einsum and the fp32 roof run with TF32 too.
    tf32 = not args.no_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    t_start = time.time()
    record = {
        "env": environment(device),
        "config": {
            "batch_size": B,
            "seqs": seqs,
            "shapes": shapes,
            "dtypes": args.dtypes,
            "allow_tf32": tf32,
            "tf32_rounding": tf32_rounding(),
        },
        "ceilings_tflops": ceilings(timer, device, 8192 if gpu else 256),
        "rows": [],
    }
    for dtype_name in args.dtypes:
        for T in seqs:
            for d, p in shapes:
                row = run_case(timer, device, dtype_name, B, T, d, p, allow_tf32=tf32)
                record["rows"].append(row)
                print(f"{dtype_name} T={T} {d}->{p}: ms={ {k: round(v, 3) for k, v in row['ms'].items()} } "
                      f"err={ {k: f'{v:.1e}' for k, v in row['max_rel_err'].items()} } {row['errors'] or ''}",
                      flush=True)  # fmt: skip
    d_qkv = 1152 if gpu else 32
    record["shared_input"] = [
        run_shared_case(timer, device, dtype_name, B, T, d_qkv, allow_tf32=tf32)
        for dtype_name in args.dtypes
        for T in seqs
        if choose_path(T, d_qkv, d_qkv, DTYPES[dtype_name]) == "gram"
    ]
    record["tuned_configs"] = {repr(k): v for k, v in flash_norms_tuning.chosen_configs().items()}
    record["wall_s"] = time.time() - t_start
    return _write(record, args)


def _write(record: dict, args) -> int:
    table = markdown(record)
    atomic_write_json(args.output, record, indent=1)
    atomic_write_text(args.markdown, table + "\n")
    print(table)
    rows = record["rows"] + record["shared_input"]
    failed = [(r["dtype"], r["T"], r["d"], r["p"], m) for r in rows for m in r["errors"] if m != "opacus"]
    if failed:
        print(f"flash kernel failures: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_tool(Path(__file__).name, main))
