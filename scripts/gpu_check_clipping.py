"""Does any sample's clipped contribution exceed C? Every mode x precision on DiT-XL/2, before and after the margins.

On one H200 (about 5 minutes; prints a line per cell):
    python scripts/gpu_check_clipping.py --output results/clipping_check/h200_xl2_b32.json \\
        --markdown results/clipping_check/h200_xl2_b32.md
CPU smoke test (tiny DiT, seconds; TF32 does not exist on a CPU, so "fp32_tf32" runs as plain fp32 there):
    python scripts/gpu_check_clipping.py --tiny --output /tmp/clip.json --markdown /tmp/clip.md

What is measured. "The contribution of sample i" is the exact (float64) sum over sample i's rows of the products
of the operands that form the clipped gradient, as those operands are in memory, for every trainable layer:

- book-keeping modes: the row-scaled operand exactly as the engine forms it (c_i cast to the operand's dtype, the
  product rounded to that dtype: ``layer_rules.ClipCoefficients``) times the other cached operand; the bias term
  c_i (in G's dtype) times the sum of G's rows;
- two-pass modes: the second backward's own output gradients G'_i (recomputed with c_i folded into the loss, in
  the step's precision) times the layer inputs A_i.

Only the rounding of the cross-sample sum (the GEMM's accumulator and output cast) is left out: it rounds the
released sum, not one sample's term. Where the clipped-sum GEMM takes fp32 operands under TF32, the tensor cores
also round those operands; the column ``max ratio (TF32 GEMM)`` repeats the measurement with both operands rounded
to nearest TF32 (the worse of cuBLAS' possible conversions for this check; truncation only shrinks them).
The ratio ||contribution_i|| / C is reported as its maximum over the batch (target: <= 1 + 1e-6), with counts;
per-sample norms are never written. ``norm rel err`` compares the engine's norms (with the bound's u·D term when
margins are on) with the float64 norm of the first-pass gradient, min / mean / max over the batch: its sign says
biased low or high. ``clip factor`` is the factor f the engine multiplied them by before clipping (1 without
margins); ``sum check`` compares the reproduced clipped sum with the one the engine wrote (it must be small).

C is a fraction (--clip-fraction, default 0.5) of the median float64 per-sample norm of a probe step (fp32, no
TF32), so most samples are clipped. "before" runs with the margins off (MEMORY_TEST_NORM_MARGINS=0: today's
behaviour), "after" with them on; "after_rounding" adds FLASH_NORMS_TF32_ROUNDING=1 (only flash modes in
fp32_tf32 are run for it). Triton's autotuner is off (FLASH_NORMS_AUTOTUNE=0: correctness only).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("FLASH_NORMS_AUTOTUNE", "0")  # before the kernels are imported: no timing, one config

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from memory_test.cli_common.errors import run_tool  # noqa: E402
from memory_test.cli_common.files import atomic_write_json, atomic_write_text  # noqa: E402
from memory_test.kernels.flash_norms import TF32_ROUNDING_ENV  # noqa: E402
from memory_test.kernels.norm_error import MARGINS_ENV  # noqa: E402
from memory_test.models.dit_huggingface_wrapper import DiTHuggingFaceWrapper  # noqa: E402
from memory_test.privacy import MODES, PrivacyEngine  # noqa: E402
from memory_test.privacy.layer_rules import EmbeddingRule, LinearLikeRule, Use  # noqa: E402
from memory_test.privacy.modes import BOOKKEEPING  # noqa: E402
from memory_test.privacy.norm_rules import AffineNormRule  # noqa: E402
from memory_test.privacy.opacus_rules import MaterializedRule  # noqa: E402
from memory_test.privacy.rules import rule_for  # noqa: E402
from memory_test.profiling.environment import environment  # noqa: E402
from memory_test.records.io import check_writable_output  # noqa: E402

TOLERANCE = 1e-6
DEFAULT_MODES = ("ghost", "bookkeeping", "flash_clip", "flash_clip_bk")
# precision -> (autocast dtype, TF32 for fp32 matmuls): the suite's fp32 runs use TF32, its bf16 runs too. Plain fp32
# (IEEE, expected exact) comes last: if the deadline cuts the run short, it loses the least informative cells.
PRECISIONS = {"fp32_tf32": (None, True), "bf16": (torch.bfloat16, True), "fp32": (None, False)}
VARIANTS = {
    "before": {MARGINS_ENV: "0", TF32_ROUNDING_ENV: "0"},
    "after": {MARGINS_ENV: "1", TF32_ROUNDING_ENV: "0"},
    "after_rounding": {MARGINS_ENV: "1", TF32_ROUNDING_ENV: "1"},
}
_CHUNK_BYTES = 512 << 20  # float64 temporaries per chunk of samples


# ----- per-sample float64 algebra ------------------------------------------------------------------------------


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest TF32 value (ties away from zero), as fp32: what round-to-nearest tensor-core inputs see."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def weight_terms(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample ||G_iᵀA_i||² (n,), Σ_i G_iᵀA_i (p, d)), exactly in float64, chunked over samples."""
    n, R, d = A.shape
    p = G.shape[-1]
    step = max(1, _CHUNK_BYTES // (8 * (R * (d + p) + d * p)))
    sq = torch.empty(n, dtype=torch.float64, device=A.device)
    total = torch.zeros(p, d, dtype=torch.float64, device=A.device)
    for lo in range(0, n, step):
        M = torch.bmm(G[lo : lo + step].double().transpose(1, 2), A[lo : lo + step].double())
        sq[lo : lo + step] = M.square().sum(dim=(1, 2))
        total += M.sum(dim=0)
    return sq, total


@dataclass
class Terms:
    """One layer's per-sample float64 squared norms and its clipped sum (parameter -> float64 tensor)."""

    true_sq: torch.Tensor
    contrib_sq: torch.Tensor
    contrib_sq_tf32: torch.Tensor | None = None
    summed: dict = field(default_factory=dict)


def _cat_rows(pairs):
    if len(pairs) == 1:
        return pairs[0]
    return torch.cat([a for a, _ in pairs], dim=1), torch.cat([g for _, g in pairs], dim=1)


def bookkeeping_operands(A: torch.Tensor, G: torch.Tensor, coef: torch.Tensor):
    """The clipped-sum GEMM's operands as LinearLikeRule.clipped_grads forms them: the smaller operand scaled by c
    cast to its own dtype (product rounded to it), both then cast to the lower-precision dtype of the two."""
    d, p = A.shape[-1], G.shape[-1]
    dtype = A.dtype if A.dtype == G.dtype else min((A.dtype, G.dtype), key=lambda t: torch.finfo(t).bits)
    c = coef.view(-1, 1, 1)
    if d <= p:
        A = A * c.to(A.dtype)
    else:
        G = G * c.to(G.dtype)
    return A.to(dtype), G.to(dtype)


def linear_terms(rule, module, uses, n, coef, bookkeeping: bool, tf32_gemm: bool) -> Terms:
    first = _cat_rows([rule.rows(module, Use(u.inputs, u.grads[0]), n) for u in uses])
    second = first if bookkeeping else _cat_rows([rule.rows(module, Use(u.inputs, u.grads[-1]), n) for u in uses])
    weight, bias = rule.weight_and_bias(module)
    w_on, b_on = weight is not None and weight.requires_grad, bias is not None and bias.requires_grad
    zeros = torch.zeros(n, dtype=torch.float64, device=coef.device)
    true_sq, contrib_sq = zeros.clone(), zeros.clone()
    tf32_sq = zeros.clone() if tf32_gemm else None
    terms = Terms(true_sq, contrib_sq, tf32_sq)
    if w_on:
        true_sq += weight_terms(*first)[0]
        A_c, G_c = bookkeeping_operands(*first, coef) if bookkeeping else second
        sq, total = weight_terms(A_c, G_c)
        contrib_sq += sq
        terms.summed[weight] = total
        if tf32_gemm and A_c.dtype == torch.float32 and G_c.dtype == torch.float32:
            tf32_sq += weight_terms(round_tf32(A_c), round_tf32(G_c))[0]
        elif tf32_gemm:
            tf32_sq += sq
    if b_on:
        G = first[1]
        true_sq += G.double().sum(dim=1).square().sum(dim=1)
        if bookkeeping:  # Σ_rows c_row G_row: c cast to G's dtype (ClipCoefficients.per_row), exact products
            b = coef.to(G.dtype).double().view(-1, 1) * G.double().sum(dim=1)
        else:
            b = second[1].double().sum(dim=1)
        contrib_sq += b.square().sum(dim=1)
        if tf32_gemm:
            tf32_sq += b.square().sum(dim=1)  # a GEMV: no tensor cores
        terms.summed[bias] = b.sum(dim=0)
    return terms


def _embedding_rows(module, use_inputs, grad, n):
    idx = use_inputs[0].reshape(n, -1)
    G = grad.reshape(n, idx.shape[1], -1)
    if module.padding_idx is not None:
        G = G * (idx != module.padding_idx).unsqueeze(-1).to(G.dtype)
    return idx, G


def _embedding_sq(idx, G64):
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(torch.float64)
    return (torch.bmm(G64, G64.transpose(1, 2)) * same).sum(dim=(1, 2))


def embedding_terms(module, uses, n, coef, bookkeeping: bool, tf32_gemm: bool) -> Terms:
    first = [_embedding_rows(module, u.inputs, u.grads[0], n) for u in uses]
    idx = torch.cat([i for i, _ in first], dim=1)
    G = torch.cat([g for _, g in first], dim=1)
    if bookkeeping:  # G * c cast to G's dtype, rounded in it (EmbeddingRule.clipped_grads)
        Gc = G * coef.to(G.dtype).view(-1, 1, 1)
    else:
        Gc = torch.cat([_embedding_rows(module, u.inputs, u.grads[-1], n)[1] for u in uses], dim=1)
    Gc64 = Gc.double()
    table = torch.zeros(module.weight.shape, dtype=torch.float64, device=G.device)
    table.index_add_(0, idx.reshape(-1), Gc64.reshape(-1, Gc64.shape[-1]))
    contrib = _embedding_sq(idx, Gc64)
    tf32_sq = contrib.clone() if tf32_gemm else None  # fp32 G scaled elementwise, summed by index_add: no GEMM
    return Terms(_embedding_sq(idx, G.double()), contrib, tf32_sq, {module.weight: table})


def materialized_terms(rule, module, uses, n, coef, bookkeeping: bool, tf32_gemm: bool) -> Terms:
    def per_sample(pass_index):
        if isinstance(rule, AffineNormRule):  # the engine's own norm rules: per-sample grads in float64
            passes = [Use(u.inputs, grad_output=u.grads[pass_index]) for u in uses]
            return rule.per_sample(module, passes, n, lambda g: torch.float64)
        out = {}
        for u in uses:
            for p, gs in rule.grad_sampler(module, list(u.inputs), u.grads[pass_index]).items():
                if p.requires_grad:
                    gs = gs.reshape(n, -1, *p.shape).sum(dim=1)
                    out[p] = out[p] + gs if p in out else gs
        return out

    first = per_sample(0)
    second = first if bookkeeping else per_sample(-1)
    zeros = torch.zeros(n, dtype=torch.float64, device=coef.device)
    terms = Terms(zeros.clone(), zeros.clone())
    for p, gs in first.items():
        terms.true_sq += gs.double().reshape(n, -1).square().sum(dim=1)
        scale = coef.to(gs.dtype).double().view(-1, *[1] * (gs.dim() - 1)) if bookkeeping else 1.0
        contrib = second[p].double() * scale
        terms.contrib_sq += contrib.reshape(n, -1).square().sum(dim=1)
        terms.summed[p] = contrib.sum(dim=0)
    terms.contrib_sq_tf32 = terms.contrib_sq.clone() if tf32_gemm else None
    return terms


# ----- capturing A and G of every pass -------------------------------------------------------------------------


@dataclass
class CapturedUse:
    inputs: tuple
    grads: list = field(default_factory=list)  # one output gradient per backward pass that reached the layer


class LayerCapture:
    """Forward hooks, registered after the engine's, record each trainable layer's inputs (after the engine's
    autocast pre-cast) and hook its tapped output so that every backward pass's output gradient is kept."""

    def __init__(self, model: nn.Module):
        self.layers = []
        for name, module in model.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                rule = rule_for(module)
                if rule is None:
                    raise SystemExit(f"error: layer {name} ({type(module).__name__}) has no rule; nothing to check")
                self.layers.append((name, module, rule))
        self.uses = {module: [] for _, module, _ in self.layers}
        self._handles = [module.register_forward_hook(self._hook) for _, module, _ in self.layers]

    def _hook(self, module, inputs, output):
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        use = CapturedUse(tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs))
        self.uses[module].append(use)
        output.register_hook(lambda g, use=use: use.grads.append(g.detach()))

    def remove(self):
        for h in self._handles:
            h.remove()

    def terms(self, n: int, coef: torch.Tensor, bookkeeping: bool, tf32_gemm: bool):
        """Yield (name, module, Terms) for every layer that received an output gradient."""
        for name, module, rule in self.layers:
            uses = [u for u in self.uses[module] if u.grads]
            if not uses:
                continue
            if isinstance(rule, LinearLikeRule):
                t = linear_terms(rule, module, uses, n, coef, bookkeeping, tf32_gemm)
            elif isinstance(rule, EmbeddingRule):
                t = embedding_terms(module, uses, n, coef, bookkeeping, tf32_gemm)
            elif isinstance(rule, (MaterializedRule, AffineNormRule)):
                t = materialized_terms(rule, module, uses, n, coef, bookkeeping, tf32_gemm)
            else:
                raise SystemExit(f"error: no contribution formula for rule {type(rule).__name__} ({name})")
            self.uses[module] = []  # free the captured tensors as we go
            yield name, module, t


# ----- one cell: (precision, variant, mode) --------------------------------------------------------------------


def per_sample_mse(pred, target):
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


per_sample_mse.reduction = "mean"


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    autocast_dtype, tf32 = PRECISIONS[precision]
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield autocast_dtype
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def variant_env(variant: str):
    saved = {k: os.environ.get(k) for k in VARIANTS[variant]}
    os.environ.update(VARIANTS[variant])
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def dp_step(base, mode, batch, max_grad_norm, autocast_dtype):
    """One DP backward of ``mode`` with every layer captured; returns (dp_model, capture, coefficients)."""
    model = copy.deepcopy(base)
    n = batch[0].shape[0]
    loader = DataLoader(TensorDataset(torch.zeros(n)), batch_size=n)
    dp_model, _, crit, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=loader,
        criterion=per_sample_mse, noise_multiplier=0.0, max_grad_norm=max_grad_norm, grad_sample_mode=mode,
        poisson_sampling=False,
    )  # fmt: skip
    capture = LayerCapture(model)
    coefs = []
    record_norms = dp_model.record_norms

    def recording(*args, **kwargs):  # the coefficients the engine clipped with
        coef = record_norms(*args, **kwargs)
        coefs.append(coef.detach())
        return coef

    dp_model.record_norms = recording
    x, t, y, target = batch
    ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        pred = dp_model(x, t, y)
    crit(pred, target).backward()
    capture.remove()
    return dp_model, capture, coefs[-1]


def true_norms(base, batch, device) -> torch.Tensor:
    """Float64 per-sample gradient norms of a probe step (ghost, fp32 without TF32, nothing clipped)."""
    with precision_context("fp32", device), variant_env("before"):
        dp_model, capture, coef = dp_step(base, "ghost", batch, 1e30, None)
        sq = sum(t.true_sq for _, _, t in capture.terms(batch[0].shape[0], coef, False, False))
    del dp_model
    return sq.sqrt()


def run_cell(base, mode, precision, variant, batch, C, device) -> dict:
    t0 = time.perf_counter()
    bookkeeping = MODES[mode].strategy == BOOKKEEPING
    n = batch[0].shape[0]
    with precision_context(precision, device) as autocast_dtype, variant_env(variant):
        dp_model, capture, coef = dp_step(base, mode, batch, C, autocast_dtype)
        tf32_gemm = device.type == "cuda" and PRECISIONS[precision][1]
        true_sq = torch.zeros(n, dtype=torch.float64, device=device)
        contrib_sq, tf32_sq = true_sq.clone(), true_sq.clone()
        num = den = 0.0
        for _, _, t in capture.terms(n, coef.to(device), bookkeeping, tf32_gemm):
            true_sq += t.true_sq
            contrib_sq += t.contrib_sq
            if t.contrib_sq_tf32 is not None:
                tf32_sq += t.contrib_sq_tf32
            for p, total in t.summed.items():  # the reproduced clipped sum vs the one the engine wrote
                got = p.grad.double().reshape(total.shape)
                num += float((total - got).square().sum())
                den += float(got.square().sum())
        engine_norms = dp_model.per_sample_gradient_norms.double()
        margin = dp_model.norm_error_margin
    true_norm = true_sq.sqrt()
    ratio = contrib_sq.sqrt() / C
    rel = engine_norms / true_norm - 1
    cell = {
        "precision": precision,
        "variant": variant,
        "mode": mode,
        "samples": n,
        "clipped": int((coef < 1).sum()),
        "max_contribution_ratio": float(ratio.max()),
        "exceeding": int((ratio > 1 + TOLERANCE).sum()),
        "max_contribution_ratio_tf32_gemm": float(tf32_sq.sqrt().max() / C) if tf32_gemm else None,
        "exceeding_tf32_gemm": int((tf32_sq.sqrt() / C > 1 + TOLERANCE).sum()) if tf32_gemm else None,
        "norm_rel_err": {"min": float(rel.min()), "mean": float(rel.mean()), "max": float(rel.max())},
        "clip_factor": margin["clip_factor"],
        "clipped_sum_rel_err": math.sqrt(num / den) if den else None,
        "norm_error_margin": margin,
        "wall_ms": (time.perf_counter() - t0) * 1e3,
    }
    del dp_model, capture
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cell


def cell_verdict(cell: dict) -> bool:
    worst = max(cell["max_contribution_ratio"], cell["max_contribution_ratio_tf32_gemm"] or 0.0)
    return worst <= 1 + TOLERANCE


# ----- set-up, output ------------------------------------------------------------------------------------------


def build_model(args, device) -> nn.Module:
    torch.manual_seed(args.seed)
    with torch.device(device):  # built on the device: a CPU init of DiT-XL/2 costs seconds
        model = DiTHuggingFaceWrapper(args.model, img_size=args.img_size, pretrained=False, class_dropout_prob=0.0)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():  # diffusers zero-inits adaLN and the output head: random weights exercise every path
        for p in model.parameters():
            p.normal_(0, args.init_std, generator=gen)
    return model.to(device).train()


def make_batch(model, n, device, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    side = model.config["sample_size"]
    shape = (n, model.in_channels, side, side)
    return (
        torch.randn(shape, generator=gen).to(device),
        torch.randint(0, 1000, (n,), generator=gen).to(device),
        torch.randint(0, model.num_classes, (n,), generator=gen).to(device),
        torch.randn(shape, generator=gen).to(device),
    )


def plan(args, device) -> list[tuple[str, str, str]]:
    cells = []
    for precision in args.precisions:
        for variant in args.variants:
            for mode in args.modes:
                if variant == "after_rounding" and not (precision == "fp32_tf32" and MODES[mode].norm == "flash"):
                    continue  # the rounding switch only changes flash kernels' TF32 dots
                cells.append((precision, variant, mode))
    return cells


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x - 1:+.1e}"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def progress_line(c: dict) -> str:
    return (
        f"{c['precision']:9s} {c['variant']:14s} {c['mode']:14s} max ratio - 1 = {_signed(c['max_contribution_ratio'])}"
        f" (TF32 GEMM {_signed(c['max_contribution_ratio_tf32_gemm'])}), {c['exceeding']}/{c['clipped']} clipped "
        f"exceed, norm rel err mean {c['norm_rel_err']['mean']:+.1e}, sum check {_sci(c['clipped_sum_rel_err'])}"
    )


def markdown(record: dict) -> str:
    cfg, env = record["config"], record["env"]
    head = (
        f"Clipped contributions, {cfg['model']} B={cfg['batch_size']} on {env.get('gpu_name') or env['device_type']}, "
        f"C = {cfg['clip_fraction']} x median norm; value = max_i ||contribution_i|| / C - 1 (target <= {TOLERANCE:g})"
    )
    lines = [
        head,
        "",
        "| precision | mode | variant | max ratio - 1 | max ratio - 1 (TF32 GEMM) | exceeding / clipped / n "
        "| norm rel err min / mean / max | clip factor - 1 | sum check | ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in record["cells"]:
        if c.get("status") == "skipped":
            lines.append(f"| {c['precision']} | {c['mode']} | {c['variant']} | skipped ({c['message']}) ||||||||")
            continue
        e = c["norm_rel_err"]
        lines.append(
            f"| {c['precision']} | {c['mode']} | {c['variant']} | {_signed(c['max_contribution_ratio'])} "
            f"| {_signed(c['max_contribution_ratio_tf32_gemm'])} | {c['exceeding']} / {c['clipped']} / {c['samples']} "
            f"| {e['min']:+.1e} / {e['mean']:+.1e} / {e['max']:+.1e} | {c['clip_factor'] - 1:.1e} "
            f"| {_sci(c['clipped_sum_rel_err'])} "
            f"| {'yes' if cell_verdict(c) else 'NO'} |"
        )
    return "\n".join(lines)


def write_outputs(record: dict, json_path: str, md_path: str) -> str:
    table = markdown(record)
    atomic_write_json(json_path, record, indent=1)
    atomic_write_text(md_path, table + "\n")
    return table


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="JSON record (ms; maxima and counts only, never per-sample norms)")
    ap.add_argument("--markdown", required=True, help="markdown table, also printed last")
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--img-size", type=int, default=None, help="default: the model's")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--variants", default="before,after", help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--clip-fraction", type=float, default=0.5, help="C = this x the probe's median norm")
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=400.0,
        help="cells not started by then are recorded skipped (the run stays under 8 minutes)",
    )
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: DiT-tiny, batch 4, on the CPU")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model, args.device, args.batch_size = "DiT-tiny", "cpu", 4
    args.modes = args.modes.split(",")
    args.precisions = args.precisions.split(",")
    args.variants = args.variants.split(",")
    for values, known, what in (
        (args.modes, DEFAULT_MODES, "--modes"),
        (args.precisions, PRECISIONS, "--precisions"),
        (args.variants, VARIANTS, "--variants"),
    ):
        bad = [v for v in values if v not in known]
        if bad:
            ap.error(f"{what}: unknown {bad}; choose from {', '.join(known)}")
    if not 0 < args.clip_fraction < 1:
        ap.error("--clip-fraction must be in (0, 1): most samples must be clipped")
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    for path in (args.output, args.markdown):
        problem = check_writable_output(path)
        if problem:
            ap.error(problem)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA device; use --tiny (or --device cpu) for the CPU smoke test")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    base = build_model(args, device)
    batch = make_batch(base, args.batch_size, device, args.seed)
    C = args.clip_fraction * float(true_norms(base, batch, device).median())
    print(f"{args.model} B={args.batch_size} on {device}: C = {args.clip_fraction} x median norm "
          f"(built and probed in {time.perf_counter() - t_start:.0f} s)", flush=True)  # fmt: skip
    cells, todo = [], plan(args, device)
    print(f"{len(todo)} cells (precision x variant x mode), deadline {args.deadline_s:.0f} s", flush=True)
    for precision, variant, mode in todo:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.deadline_s:
            cells.append({"precision": precision, "variant": variant, "mode": mode, "status": "skipped",
                          "message": f"deadline {args.deadline_s:.0f} s passed"})  # fmt: skip
            continue
        cell = run_cell(base, mode, precision, variant, batch, C, device)
        cells.append(cell)
        print(f"[{elapsed:5.0f} s] {progress_line(cell)}", flush=True)
    record = {
        "what": "max over a batch of ||clipped contribution_i||_float64 / C per (precision, margin variant, mode)",
        "config": {
            "model": args.model,
            "img_size": args.img_size,
            "batch_size": args.batch_size,
            "clip_fraction": args.clip_fraction,
            "init_std": args.init_std,
            "seed": args.seed,
            "tolerance": TOLERANCE,
            "variants": {v: VARIANTS[v] for v in args.variants},
            "autotune": os.environ.get("FLASH_NORMS_AUTOTUNE"),
        },
        "env": environment(device),
        "cells": cells,
        "all_after_within_tolerance": all(
            cell_verdict(c) for c in cells if c.get("status") != "skipped" and c["variant"] != "before"
        ),
        "wall_ms": (time.perf_counter() - t_start) * 1e3,
    }
    print(write_outputs(record, args.output, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(Path(__file__).name, main))
