"""invertnet: build, invert, certify and train invertible neural networks, with known errors."""

from invertnet.core import ConvergenceError as ConvergenceError
from invertnet.core import InverseResult as InverseResult
from invertnet.core import InvertibleModule as InvertibleModule
from invertnet.core import InvertibleSequential as InvertibleSequential
from invertnet.core import IterativeInvertibleModule as IterativeInvertibleModule
from invertnet.core import SolverStatus as SolverStatus

__version__ = "0.1.0"
"""The package version; the only place it is written (pyproject.toml reads it, so the wheel's metadata agrees)."""

__all__ = [
    "ConvergenceError",
    "InverseResult",
    "InvertibleModule",
    "InvertibleSequential",
    "IterativeInvertibleModule",
    "SolverStatus",
]
