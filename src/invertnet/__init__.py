"""invertnet: build, invert, certify and train invertible neural networks, with known errors.

The core contract (:mod:`invertnet.core`) is importable from here; it is loaded on first use, so that
``import invertnet`` (and the command line's ``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from invertnet.core import (
        ConvergenceError,
        InverseResult,
        InvertibleModule,
        InvertibleSequential,
        IterativeInvertibleModule,
        SolverOptions,
        SolverStatus,
        set_validation,
        validation,
        validation_enabled,
    )

__version__ = "0.2.0.dev0"
"""The package version; the only place it is written (pyproject.toml reads it, so the wheel's metadata agrees)."""

__all__ = [
    "ConvergenceError",
    "InverseResult",
    "InvertibleModule",
    "InvertibleSequential",
    "IterativeInvertibleModule",
    "SolverOptions",
    "SolverStatus",
    "set_validation",
    "validation",
    "validation_enabled",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("invertnet.core"), name)
    raise AttributeError(f"module 'invertnet' has no attribute {name!r}")
