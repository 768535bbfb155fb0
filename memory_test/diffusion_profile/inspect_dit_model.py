#!/usr/bin/env python3
"""Print a DiT's trainable layers: type, parameter count, forward uses (reused modules) and each layer's norm path.

    python memory_test/diffusion_profile/inspect_dit_model.py                       # DiT-XL/2, 256 px
    python memory_test/diffusion_profile/inspect_dit_model.py --model DiT-tiny --mode bookkeeping --all

The norm path (how the DP engine computes the layer's per-sample gradient norm) comes from the engine's
``memory_test.privacy.describe_layers``; without it, layers and forward-use counts are listed from hooks alone.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from memory_test.cli_common.errors import ToolArgumentParser, ToolError, run_tool  # noqa: E402


def count_uses(model, example_inputs) -> dict[str, int]:
    """Forward calls per module (by name) during one no-grad forward; > 1 means the module is reused."""
    import torch

    names = {m: n for n, m in model.named_modules()}
    calls: Counter = Counter()
    handles = [m.register_forward_hook(lambda m, i, o: calls.update([names[m]])) for m in names]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return dict(calls)


def describe(model, mode: str, example_inputs) -> tuple[list[dict], str]:
    """Rows (name, type, params, uses, norm_path) and where the norm paths came from."""
    try:
        from memory_test.privacy import describe_layers
    except ImportError:
        describe_layers = None
    if describe_layers is not None:
        rows = describe_layers(model, mode, example_inputs)
        for r in rows:
            r.setdefault("params", r.get("trainable_params"))
        return rows, f"memory_test.privacy.describe_layers (mode {mode})"
    uses = count_uses(model, example_inputs)
    rows = []
    for name, sub in model.named_modules():
        params = [p for p in sub.parameters(recurse=False) if p.requires_grad]
        if params:
            rows.append(
                {
                    "name": name or "<root>",
                    "type": type(sub).__name__,
                    "params": sum(p.numel() for p in params),
                    "uses": uses.get(name, 0),
                    "norm_path": None,
                }
            )
    return rows, "forward hooks only: the engine's describe_layers is not available, so no norm paths"


TOOL = "inspect_dit_model.py"


def check_args(args: argparse.Namespace) -> None:
    """Every flag before the model is built: ToolError for the first bad one."""
    for flag, value in (("--batch-size", args.batch_size), ("--image-size", args.image_size)):
        if value is not None and value < 1:
            raise ToolError(f"{flag} must be a positive integer, got {value}", f"see `{TOOL} --help`")
    if args.num_classes is not None and args.num_classes < 1:
        raise ToolError(f"--num-classes must be >= 1, got {args.num_classes}", f"see `{TOOL} --help`")
    try:
        from memory_test.privacy import MODES
    except ImportError:  # without the engine only forward uses are listed: any mode name will do
        return
    # the engine's own modes only: upstream hooks, which the engine also accepts, has no norm paths to show
    accepted = sorted(name for mode in MODES.values() for name in (mode.name, *mode.aliases))
    if args.mode not in accepted:
        why = "is upstream Opacus: it has no norm paths" if args.mode == "hooks" else "is not a mode of the engine"
        raise ToolError(f"--mode {args.mode!r} {why}", f"pick one of {', '.join(accepted)}")


def main(argv: list[str] | None = None) -> int:
    return run_tool(TOOL, lambda: _inspect(argv), bad_input=(ValueError,))


def _inspect(argv: list[str] | None) -> int:
    args = _parse(argv)
    check_args(args)
    from memory_test.models.dit_huggingface_wrapper import DiTHuggingFaceWrapper

    model = DiTHuggingFaceWrapper(
        model_name=args.model, img_size=args.image_size, num_classes=args.num_classes, pretrained=False
    )  # a bad --model/--image-size is a ValueError naming the fix: one line, exit 2
    model.eval()  # no label dropout in the example forward
    rows, source = describe(model, args.mode, _example_inputs(model, args.batch_size))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.model}: {total:,} parameters ({trainable:,} trainable), {model.tokens_per_sample} tokens per sample")
    print(f"config: {model.config}")
    print(f"norm paths from: {source}\n")
    _print_layers(rows, args.all)
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = ToolArgumentParser(prog=TOOL, description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="DiT-XL/2", help="DiT preset, e.g. DiT-XL/2, DiT-B/2, DiT-tiny")
    ap.add_argument("--image-size", type=int, default=None, help="default: the model's")
    ap.add_argument("--num-classes", type=int, default=None)
    ap.add_argument("--mode", default="bookkeeping", help="the engine's DP mode whose norm paths are shown")
    ap.add_argument("--batch-size", type=int, default=2, help="rows of the example forward")
    ap.add_argument("--all", action="store_true", help="list every layer (default: block 0, one other block, head)")
    return ap.parse_args(argv)


def _example_inputs(model, batch_size: int) -> tuple:
    import torch

    s = model.sample_size
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch_size, model.in_channels, s, s, generator=gen),
        torch.randint(0, 1000, (batch_size,), generator=gen),
        torch.randint(0, model.num_classes, (batch_size,), generator=gen),
    )


def _print_layers(rows: list[dict], every_layer: bool) -> None:
    shown = rows
    if not every_layer:
        shown = [r for r in rows if ".transformer_blocks." not in r["name"] or ".transformer_blocks.0." in r["name"]]
    width = max(len(r["name"]) for r in shown) if shown else 10
    print(f"{'layer':<{width}}  {'type':<18} {'params':>12}  {'uses':>4}  norm path")
    for r in shown:
        uses = "" if r.get("uses") is None else str(r["uses"])
        print(f"{r['name']:<{width}}  {r['type']:<18} {r['params']:>12,}  {uses:>4}  {r.get('norm_path') or '-'}")
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} more layers in blocks 1..N (same structure as block 0); --all lists them")
    reused = [r for r in rows if (r.get("uses") or 0) > 1]
    print(f"\nreused modules (called more than once per forward): {len(reused)}")
    for r in reused:
        print(f"  {r['name']} ({r['type']}): {r['uses']} uses")
    paths = Counter(r.get("norm_path") or "-" for r in rows)
    print("norm paths: " + ", ".join(f"{k}: {v}" for k, v in sorted(paths.items())))


if __name__ == "__main__":
    sys.exit(main())
