"""What the wrapped model reports about its own work, for records and scripts: never per-sample data.

``DPGradSampleModule.stats()`` returns one frozen ``EngineStats``; ``reset_peaks()`` restarts the cache peak (e.g.
after warm-up steps), so that a profiler reads the engine through these two calls only, never its attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineStats:
    """The engine's own account of the steps since ``reset_peaks()`` (the norm paths: of the last step)."""

    # Peak bytes of storage referenced by the caches (layer inputs, partly the tensors autograd saves anyway, and
    # output gradients): they overlap activations, so they are not additive to an allocator's breakdown.
    cache_peak_bytes: int
    kernel_backend: str  # what computes the Linear norms: "triton" or "torch"
    norm_paths: dict[str, str] = field(default_factory=dict)  # layer name -> norm path
    # Whether FLASH_NORMS_TF32_ROUNDING=1 rounded fp32 operands to nearest TF32 (Triton kernels only, else None).
    flash_tf32_rounding: bool | None = None
    # The clipping margins of the last step, once the engine reports them (DPGradSampleModule.norm_error_margin,
    # issue 15); None until then and for engines without it.
    norm_error_margin: dict | None = None
    # Compiled models (dp_model.compile): how the per-layer work after the backward ran: "compiled" (post-backward
    # programs), "eager: <why>" (they fell back), "off"; None for an eager model.
    post_programs: str | None = None

    @property
    def norm_path_counts(self) -> dict[str, int]:
        """Norm path -> number of layers that took it."""
        counts: dict[str, int] = {}
        for path in self.norm_paths.values():
            counts[str(path)] = counts.get(str(path), 0) + 1
        return counts
