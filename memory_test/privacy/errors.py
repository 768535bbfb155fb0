"""Errors the engine raises itself, each saying how to fix the problem."""


class PrivacyConfigError(ValueError):
    """A DP set-up that cannot give a correct per-sample clipped update."""


class UnsupportedLayerError(PrivacyConfigError):
    """A trainable layer type without an exact per-sample norm and clipped-gradient rule."""


class SharedParameterError(PrivacyConfigError):
    """A trainable parameter owned by two different modules (true weight tying)."""


class CriterionError(PrivacyConfigError):
    """A criterion that does not return per-sample losses of shape (B,) or lacks ``reduction``."""


# Two DP losses computed from one model output: the second backward reaches layer uses the first one already used.
SPENT_FORWARD = (
    "the DP loss's backward reached a forward that an earlier backward already used (two DP losses computed from "
    "one model output?), so the step is refused. Run a new forward for each DP loss; call optimizer.zero_grad() "
    "and run the batch again."
)


class LayoutError(PrivacyConfigError):
    """A layer whose rows are not grouped by sample (sequence-first without detection, batch-independent input)."""


class CoverageError(PrivacyConfigError):
    """A trainable parameter that reaches the loss by a path no per-sample rule sees (e.g. a functional tie)."""


class PrivacyParameterError(PrivacyConfigError):
    """An invalid noise multiplier, clipping bound, target epsilon or delta."""


class NonFiniteSampleError(RuntimeError):
    """A step in which some samples' gradients were NaN or infinite: refused before noise and accounting."""
