"""Exact DP-SGD clipping modes for Opacus 1.6: ghost, book-keeping, flash (see ``MODES``)."""

from .describe import describe_layers
from .engine import PrivacyEngine
from .errors import (
    CoverageError,
    CriterionError,
    LayoutError,
    NonFiniteSampleError,
    PrivacyConfigError,
    PrivacyParameterError,
    SharedParameterError,
    UnsupportedLayerError,
)
from .grad_sample_module import DPGradSampleModule
from .modes import MODES, Mode, resolve_mode, valid_mode_names
from .stats import EngineStats

__all__ = [
    "MODES",
    "CoverageError",
    "CriterionError",
    "DPGradSampleModule",
    "EngineStats",
    "LayoutError",
    "Mode",
    "NonFiniteSampleError",
    "PrivacyConfigError",
    "PrivacyEngine",
    "PrivacyParameterError",
    "SharedParameterError",
    "UnsupportedLayerError",
    "describe_layers",
    "resolve_mode",
    "valid_mode_names",
]
