"""Launch configurations for the flash-norm kernels and a small once-per-shape tuner.

Triton's @autotune is not used: the Gram path's partial buffer depends on BLOCK_T, and a hand-rolled tuner lets
each candidate allocate its own outputs, skips configs that do not fit, and keeps tuning to a few ms per shape.
"""

from __future__ import annotations

import os
from collections.abc import Callable

# BLOCK_T x BLOCK_T fp32 tiles of A Aᵀ and G Gᵀ live in registers together: 64-row tiles on 4 warps, 128-row on 8.
GRAM_CONFIGS = (
    dict(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_T=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_T=128, BLOCK_K=32, num_warps=8, num_stages=4),
    dict(BLOCK_T=64, BLOCK_K=32, num_warps=4, num_stages=4),
)
# A plain batched GEMM over T with the output reduced in registers: matmul-tutorial tile shapes.
DIRECT_CONFIGS = (
    dict(BLOCK_D=128, BLOCK_P=128, BLOCK_T=64, GROUP_D=8, num_warps=8, num_stages=3),
    dict(BLOCK_D=128, BLOCK_P=256, BLOCK_T=64, GROUP_D=8, num_warps=8, num_stages=3),
    dict(BLOCK_D=128, BLOCK_P=128, BLOCK_T=32, GROUP_D=8, num_warps=4, num_stages=4),
    dict(BLOCK_D=64, BLOCK_P=128, BLOCK_T=64, GROUP_D=8, num_warps=4, num_stages=4),
)
# The interpreter's cost grows with tile area; 16 is tl.dot's smallest tile, so odd shapes span several tiles.
INTERPRET_CONFIGS = {
    "gram": dict(BLOCK_T=16, BLOCK_K=16, num_warps=4, num_stages=1),
    "direct": dict(BLOCK_D=16, BLOCK_P=16, BLOCK_T=16, GROUP_D=2, num_warps=4, num_stages=1),
}
CANDIDATES = {"gram": GRAM_CONFIGS, "direct": DIRECT_CONFIGS}

_chosen: dict[tuple, dict] = {}
_SMEM_LIMIT = 232448  # bytes of shared memory one Hopper block may use; larger configs would only fail to compile


def smem_bytes(kind: str, cfg: dict, elem_bytes: int) -> int:
    """Shared memory the software pipeline needs: num_stages copies of the operand tiles of one loop step."""
    if kind == "gram":
        tiles = 2 * cfg["BLOCK_T"] * cfg["BLOCK_K"]
    else:
        tiles = (cfg["BLOCK_D"] + cfg["BLOCK_P"]) * cfg["BLOCK_T"]
    return cfg["num_stages"] * tiles * elem_bytes


def tuning_enabled() -> bool:
    """FLASH_NORMS_AUTOTUNE=0 takes the first candidate of each kernel without timing."""
    return os.environ.get("FLASH_NORMS_AUTOTUNE", "1") != "0"


def chosen_configs() -> dict[tuple, dict]:
    """Every (kernel, shape key) -> config picked so far in this process, for benchmark records."""
    return dict(_chosen)


def pick_config(kind: str, key: tuple, run: Callable[[dict], object], *, interpret: bool, elem_bytes: int) -> dict:
    """The config for `kind` at `key`: cached, else the fastest candidate by a short do_bench (CUDA only)."""
    if interpret:
        return INTERPRET_CONFIGS[kind]
    full_key = (kind, *key)
    if full_key in _chosen:
        return _chosen[full_key]
    candidates = [c for c in CANDIDATES[kind] if smem_bytes(kind, c, elem_bytes) <= _SMEM_LIMIT]
    if not tuning_enabled():
        _chosen[full_key] = candidates[0]
        return candidates[0]
    from triton.runtime import errors
    from triton.testing import do_bench

    # Resource failures of one tile set (shared memory, registers rejected by ptxas) skip it; anything else raises.
    skippable = (errors.OutOfResources, getattr(errors, "PTXASError", errors.OutOfResources))

    best, best_ms, failures = None, float("inf"), []
    for cfg in candidates:
        try:
            ms = do_bench(lambda cfg=cfg: run(cfg), warmup=2, rep=10, return_mode="median")
        except skippable as e:
            failures.append(f"{cfg}: {type(e).__name__}: {e}")
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no {kind} flash-norm config fits at {key}: " + "; ".join(failures))
    _chosen[full_key] = best
    return best
