"""Errors the engine raises itself, each saying how to fix the problem."""


class PrivacyConfigError(ValueError):
    """A DP set-up that cannot give a correct per-sample clipped update."""


class UnsupportedLayerError(PrivacyConfigError):
    """A trainable layer type without an exact per-sample norm and clipped-gradient rule."""


class SharedParameterError(PrivacyConfigError):
    """A trainable parameter owned by two different modules (true weight tying)."""


class CriterionError(PrivacyConfigError):
    """A criterion that does not return per-sample losses of shape (B,) or lacks ``reduction``."""
