"""What the engine supports and what it refuses, as markdown generated from the rules registry (README's table).

python -m memory_test.privacy.support      # prints the block that README.md holds between the markers
"""

from __future__ import annotations

from .modes import MODES
from .rules import RULES

START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
_LAYOUTS = {(0,): "batch first", (0, 1): "batch first or sequence first"}

# Situations refused everywhere, whatever the layer: (situation, error type, what the message tells the user to do).
REFUSALS = [
    ("a trainable layer type not in the table, or in a configuration it lists as refused", "`UnsupportedLayerError`",
     "freeze or replace the named layers"),
    ("trainable parameters held directly by a container (e.g. PixArt's `scale_shift_table`)", "`UnsupportedLayerError`",
     "freeze them"),
    ("a supported layer with trainable parameters besides weight and bias (`torch.nn.utils.weight_norm`, "
     "`spectral_norm`)", "`UnsupportedLayerError`", "remove the reparametrisation or freeze them"),
    (
        "weights tied between two modules (a parameter an ancestor re-registers, as DPLSTM does, stays its layer's)",
        "`SharedParameterError`",
        "reuse one module object (exact) or freeze",
    ),
    ("a parameter used outside its module's forward (`h @ wte.weight.t()`)", "`CoverageError`",
     "use it through its module, or freeze it"),
    ("reentrant activation checkpointing", "`CoverageError`", "use `use_reentrant=False` (supported)"),
    ("requires_grad changed after make_private", "`CoverageError`", "set it before make_private"),
    ("a trainable parameter the optimizer does not hold", "`PrivacyConfigError` at make_private",
     "freeze it or give it to the optimizer"),
    ("gradients written by a backward outside the DP criterion (`loss.backward()` on a loss it did not make)",
     "`CoverageError` at `optimizer.step()`", "the step is refused; zero_grad and use the criterion"),
    ("a layer whose rows do not follow the batch (batch-independent input, e.g. a position table on `arange(T)`)",
     "`LayoutError`", "index or apply it per sample"),
    ("BatchNorm with batch statistics (trainable or frozen)", "`PrivacyConfigError`",
     "GroupNorm (ModuleValidator.fix), or eval mode with running statistics"),
    ("max_grad_norm not finite > 0; noise_multiplier not finite >= 0 (0 is allowed: epsilon is then reported as "
     "inf)", "`PrivacyParameterError`", "fix the value"),
    ("a NaN or infinite sample gradient", "`NonFiniteSampleError` at `optimizer.step()`",
     "the step is refused, nothing noised or accounted; zero_grad and continue"),
]  # fmt: skip


def support_markdown() -> str:
    """The markdown block, markers included."""
    lines = [START, "", "| layer | rule | layouts | refused configurations |", "|---|---|---|---|"]
    for cls, rule in sorted(RULES.items(), key=lambda kv: kv[0].__name__):
        layouts = _LAYOUTS[tuple(rule.batch_dims)]
        lines.append(f"| `{cls.__name__}` | {rule.summary} | {layouts} | {rule.refuses or '—'} |")
    lines += [
        "",
        "Every layer may be reused any number of times per forward (its uses' cross terms are exact), frozen in part "
        "(weight or bias), left in eval mode, and fed K rows per sample (noise multiplicity). Modes: "
        + ", ".join(f"`{name}`" for name in MODES)
        + ".",
        "",
        "| refused | error | the message says |",
        "|---|---|---|",
    ]
    lines += [f"| {situation} | {error} | {fix} |" for situation, error, fix in REFUSALS]
    return "\n".join([*lines, "", END])


if __name__ == "__main__":
    print(support_markdown())
