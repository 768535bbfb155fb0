"""Privacy parameters are checked where they enter: an invalid one must never turn the noise off silently."""

from __future__ import annotations

import math
import numbers

from .errors import PrivacyParameterError


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_max_grad_norm(max_grad_norm) -> None:
    """C must be finite and > 0: C <= 0 trains nothing (or flips signs) while epsilon would still be reported."""
    if not _is_number(max_grad_norm) or not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
        raise PrivacyParameterError(
            f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}: it is the clipping bound C"
        )


def check_noise_multiplier(noise_multiplier) -> None:
    """sigma must be finite and >= 0; sigma = 0 is an explicit non-private run whose epsilon is infinite."""
    if not _is_number(noise_multiplier) or not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise PrivacyParameterError(
            f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r} "
            "(0 trains without noise: not private, epsilon = inf)"
        )


def check_privacy_parameters(noise_multiplier, max_grad_norm) -> None:
    check_noise_multiplier(noise_multiplier)
    check_max_grad_norm(max_grad_norm)


def check_target(target_epsilon, target_delta) -> None:
    """make_private_with_epsilon: epsilon finite > 0, delta in (0, 1)."""
    if not _is_number(target_epsilon) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise PrivacyParameterError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not _is_number(target_delta) or not 0 < target_delta < 1:
        raise PrivacyParameterError(f"target_delta must be in (0, 1), got {target_delta!r}")


def check_noise_std(std) -> None:
    """The std the optimizer is about to use (sigma * C, possibly adjusted): finite and >= 0 or no step."""
    if not math.isfinite(std) or std < 0:
        raise PrivacyParameterError(
            f"noise std sigma*C = {std!r} is not a finite number >= 0: refusing to step (noise_multiplier and "
            "max_grad_norm were changed on the optimizer after make_private?)"
        )
