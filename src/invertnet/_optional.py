"""Optional dependencies, imported where a feature needs them (never when invertnet is imported).

The core install is torch, numpy, scipy, safetensors, tqdm, pydantic and click. Plotting, the scikit-learn digits,
image folders, mass spectra and TensorBoard logging need an extra; :func:`require` imports a module of one and, when
it is missing, raises an :class:`ImportError` that names the ``pip install`` command.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["DISTRIBUTIONS", "distribution", "require"]

DISTRIBUTIONS = {
    "IsoSpecPy": "IsoSpecPy",
    "PIL": "pillow",
    "matplotlib": "matplotlib",
    "pyimzml": "pyimzML",
    "sklearn": "scikit-learn",
    "tensorboard": "tensorboard",
    "torch.utils.tensorboard": "tensorboard",
}
"""The pip distribution that provides each optional module (and the modules under it)."""


def distribution(module_name: str) -> str:
    """The pip distribution that provides ``module_name``, from its longest prefix in :data:`DISTRIBUTIONS`.

    Raises:
        KeyError: ``module_name`` is not an optional dependency of invertnet.

    Examples:
        >>> distribution("sklearn.datasets"), distribution("torch.utils.tensorboard.writer")
        ('scikit-learn', 'tensorboard')
    """
    parts = module_name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in DISTRIBUTIONS:
            return DISTRIBUTIONS[prefix]
    raise KeyError(f"{module_name} is not an optional dependency of invertnet (known: {sorted(DISTRIBUTIONS)})")


def require(module_name: str, extra: str, feature: str = "this feature") -> ModuleType:
    """Import ``module_name`` (a dotted name such as ``"matplotlib.figure"``) from the optional ``extra``.

    Arguments:
        module_name: The module to import; it or a parent package must be a key of :data:`DISTRIBUTIONS`.
        extra: The invertnet extra that installs it, e.g. ``"plots"``.
        feature: What needs it, for the message, e.g. ``"plot_certificate"``.

    Returns:
        The imported module.

    Raises:
        ImportError: The module cannot be imported; the message names the distribution and the extra, e.g.
            "plot_certificate needs matplotlib: pip install 'invertnet[plots]'", with the original error chained.
        KeyError: ``module_name`` is not an optional dependency of invertnet (a programming error).

    Examples:
        >>> require("sklearn.datasets", "data").__name__
        'sklearn.datasets'
    """
    provider = distribution(module_name)
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"{feature} needs {provider}: pip install 'invertnet[{extra}]' (importing {module_name} failed: {error})",
            name=module_name,
        ) from error
