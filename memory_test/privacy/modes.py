"""The registry of DP clipping modes: each is norm algorithm x gradient strategy x sharding."""

from __future__ import annotations

from dataclasses import dataclass, field

# Norm algorithms: how a layer's per-sample gradient norm is computed without materialising the gradient.
GHOST = "ghost"  # torch Gram matrices (Opacus-style einsum), B x T x T in memory
FLASH = "flash"  # fused Triton kernels (Gram or direct path per layer), O(B) extra memory

# Gradient strategies: how the clipped gradient is formed once norms are known.
TWO_PASS = "two_pass"  # second backward of sum_i c_i * loss_i
BOOKKEEPING = "bookkeeping"  # one backward; clipped gradient (c*G)^T A written from cached A and G


@dataclass(frozen=True)
class Mode:
    """One DP-SGD clipping mode offered by ``memory_test.privacy.PrivacyEngine``."""

    name: str
    norm: str
    strategy: str
    sharding: str | None = None  # None, or "fsdp" (FSDP2 across GPUs)
    aliases: tuple[str, ...] = field(default_factory=tuple)
    description: str = ""

    @property
    def distributed(self) -> bool:
        return self.sharding is not None


MODES: dict[str, Mode] = {}


def register_mode(mode: Mode) -> Mode:
    for key in (mode.name, *mode.aliases):
        if key in MODES or key in _ALIASES:
            raise ValueError(f"mode name {key!r} registered twice")
        _ALIASES[key] = mode.name
    MODES[mode.name] = mode
    return mode


_ALIASES: dict[str, str] = {}

# Upstream Opacus mode that is passed through untouched: the slow, obviously-correct baseline.
UPSTREAM_PASSTHROUGH = ("hooks",)


def resolve_mode(name: str) -> Mode:
    """Return the registered mode for a canonical name or alias; ValueError listing valid names otherwise."""
    canonical = _ALIASES.get(name)
    if canonical is None:
        raise ValueError(f"unknown grad_sample_mode {name!r}; valid: {', '.join(valid_mode_names())}")
    return MODES[canonical]


def valid_mode_names() -> list[str]:
    """Every accepted grad_sample_mode: canonical names, aliases and the upstream passthrough."""
    return sorted(_ALIASES) + list(UPSTREAM_PASSTHROUGH)


register_mode(Mode("ghost", GHOST, TWO_PASS, description="Ghost clipping: Gram-matrix norms, two backward passes."))
register_mode(
    Mode(
        "bookkeeping",
        GHOST,
        BOOKKEEPING,
        aliases=("ghost_bk",),
        description="Ghost norms with book-keeping: one backward, clipped gradients from cached activations.",
    )
)
register_mode(
    Mode(
        "flash_clip",
        FLASH,
        TWO_PASS,
        aliases=("flash",),
        description="Flash clipping: fused Triton per-sample norms (Gram or direct path per layer); two passes.",
    )
)
register_mode(
    Mode(
        "flash_clip_bk",
        FLASH,
        BOOKKEEPING,
        aliases=("flash_bk", "flash_clip_bookkeeping"),
        description="Flash norms with book-keeping: one backward, fused norms, clipped gradients from cached A and G.",
    )
)

# Sharded over GPUs with FSDP2 (torchrun, one process per GPU); book-keeping only: rank-local norms, clipped
# gradients reduce-scattered into the parameter shards, noise once in total (see memory_test/privacy/fsdp.py).
register_mode(
    Mode(
        "ghost_fsdp_bk",
        GHOST,
        BOOKKEEPING,
        sharding="fsdp",
        description="Ghost norms with book-keeping on an FSDP2-sharded model (torchrun, one process per GPU).",
    )
)
register_mode(
    Mode(
        "flash_fsdp_bk",
        FLASH,
        BOOKKEEPING,
        sharding="fsdp",
        description="Flash norms with book-keeping on an FSDP2-sharded model (torchrun, one process per GPU).",
    )
)
