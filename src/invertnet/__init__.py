"""invertnet: build, invert, certify and train invertible neural networks, with known errors.

The core contract (:mod:`invertnet.core`), :func:`evaluate_log_prob`, :func:`save` and :func:`load` are
importable from here; they are loaded on first use, so that ``import invertnet`` (and the command line's
``--help``) does not import torch.
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
    from invertnet.models.evaluation import LogProbEvaluation, evaluate_log_prob
    from invertnet.models.saving import load, save

__version__ = "0.2.0.dev0"
"""The package version; the only place it is written (pyproject.toml reads it, so the wheel's metadata agrees)."""

__all__ = [
    "ConvergenceError",
    "InverseResult",
    "InvertibleModule",
    "InvertibleSequential",
    "IterativeInvertibleModule",
    "LogProbEvaluation",
    "SolverOptions",
    "SolverStatus",
    "evaluate_log_prob",
    "load",
    "save",
    "set_validation",
    "validation",
    "validation_enabled",
]


_HOMES = {
    "LogProbEvaluation": "invertnet.models.evaluation",
    "evaluate_log_prob": "invertnet.models.evaluation",
    "load": "invertnet.models.saving",
    "save": "invertnet.models.saving",
}


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(_HOMES.get(name, "invertnet.core")), name)
    raise AttributeError(f"module 'invertnet' has no attribute {name!r}")
