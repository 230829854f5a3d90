r"""What a model kind supplies to the application: its config class and the steps of a run.

A :class:`ModelKind` turns a validated run config into data, a model and its training objective, and reports
on the trained model. Steps a kind does not support (sampling a classifier, inverting a spectrum classifier,
...) raise :class:`UnsupportedOperation`, which names the kind and the step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from invertnet._optional import require

if TYPE_CHECKING:
    from invertnet.analysis import Certificate
    from invertnet.app.config import RunConfig

__all__ = [
    "DEFAULT_PARAMETER_BUDGET",
    "PARAMETER_BUDGET_VARIABLE",
    "KindConfig",
    "ModelKind",
    "RunData",
    "UnsupportedOperation",
    "ParameterBudget",
    "parameter_budget",
]

PARAMETER_BUDGET_VARIABLE = "INVERTNET_MAX_PARAMETER_BYTES"
"""Environment variable overriding :data:`DEFAULT_PARAMETER_BUDGET`: the most bytes of parameters and buffers a run
may build."""

DEFAULT_PARAMETER_BUDGET = 2e9
"""Bytes of parameters and buffers a run builds at most by default: 500 million float32 weights."""


class UnsupportedOperation(ValueError):
    """A run step that the run's model kind does not have (e.g. ``sample`` on a classifier)."""


class KindConfig(BaseModel):
    """Base of the per-kind ``model`` sections: only the fields the kind uses, named like its builder's
    arguments; any other key is an error naming it.

    ``builder`` is the library function (or class) that builds the kind's network; it is called with the
    shapes the data decide and :meth:`builder_arguments` as keywords. ``legacy_names`` maps field names of the
    flat model section written by invertnet 0.1 (one section for all kinds) to this kind's names, or to a name
    and a conversion of the value, so that run folders written then still open (:meth:`from_legacy`).
    """

    model_config = ConfigDict(extra="forbid")

    kind: str
    builder: ClassVar[Callable[..., nn.Module]]
    application_fields: ClassVar[frozenset[str]] = frozenset()
    """Fields the application reads itself (training estimator, wrappers), not passed to the builder."""
    legacy_names: ClassVar[dict[str, str | tuple[str, Callable[[Any], Any]]]] = {}
    recorded_before: ClassVar[dict[str, Any]] = {}
    """Fields added after run folders first recorded this kind, with the value those runs were trained with
    (which a later default may not be): :func:`~invertnet.app.config.read_run_config` fills them in."""

    def builder_arguments(self) -> dict[str, Any]:
        """The fields as the builder's keyword arguments."""
        return self.model_dump(exclude={"kind", *self.application_fields})

    @classmethod
    def from_legacy(cls, flat: dict[str, Any]) -> dict[str, Any]:
        """This kind's section from a flat invertnet 0.1 model section (all 26 fields): renamed fields are
        renamed, fields this kind never used are dropped."""
        section = {}
        for key, value in flat.items():
            new = cls.legacy_names.get(key, key)
            name, converted = (new, value) if isinstance(new, str) else (new[0], new[1](value))
            if name in cls.model_fields:
                section[name] = converted
        return section


#: Seed of the draw of the validation split (fixed: the same split whatever the run's seed).
VALIDATION_SEED = 0


@dataclass
class RunData:
    """The data of a run.

    Attributes:
        train, test: A tensor (N, ...) for density models, ``(x, y)`` tensors with N rows for supervised kinds.
        levels: K, the number of discrete levels of image data for flows (``None``: continuous data).
        n_classes: Number of classes of labelled data.
        extra: What a kind keeps besides (e.g. the whole spectra data set, for its report).
    """

    train: Any
    test: Any
    levels: int | None = None
    n_classes: int | None = None
    extra: Any = None
    validation: Any = None

    def to(self, device: Any) -> RunData:
        """The same data with the tensors moved to ``device``."""

        def move(part: Any) -> Any:
            if part is None:
                return None
            return tuple(tensor.to(device) for tensor in part) if isinstance(part, tuple) else part.to(device)

        return replace(self, train=move(self.train), test=move(self.test), validation=move(self.validation))

    def with_validation(self, fraction: float) -> RunData:
        """The data with ``round(fraction N)`` training samples (at least one, when fraction > 0) moved to
        ``validation``, drawn by a generator of fixed seed: the same split for every run seed and on resume."""
        if fraction <= 0:
            return self
        n = len(self.train[0] if isinstance(self.train, tuple) else self.train)
        n_validation = max(1, round(fraction * n))
        if n_validation >= n:
            raise ValueError(f"data.validation_fraction: {fraction} of {n} training samples leaves none to train on")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(VALIDATION_SEED))

        def take(indices: Tensor) -> Any:
            if isinstance(self.train, tuple):
                return tuple(tensor[indices.to(tensor.device)] for tensor in self.train)
            return self.train[indices.to(self.train.device)]

        return replace(self, train=take(order[n_validation:].sort().values), validation=take(order[:n_validation]))

    @property
    def test_inputs(self) -> Tensor:
        """The test inputs (without labels)."""
        return self.test[0] if isinstance(self.test, tuple) else self.test


class ModelKind:
    """The steps of a run for one family of models; one instance per kind name in the registry.

    Arguments:
        config: The kind's ``model`` section class (a :class:`KindConfig` with ``kind: Literal[name]``).
    """

    family: ClassVar[str] = "model"
    augmentations: ClassVar[frozenset[str]] = frozenset()
    """The ``data`` fields of augmentation and input normalisation that training reads (``augment_shift``,
    ``augment_flip``, ``normalization``); a kind refuses the others when they are set."""
    validated: ClassVar[bool] = True
    """Whether runs hold out ``data.validation_fraction`` of the training data to choose their weights."""
    requires: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    """Optional dependencies a run of this kind needs, as (module, extra, what needs it): checked before training,
    so that a missing one is named before the run's time is spent, not after."""

    def __init__(self, config: type[KindConfig]) -> None:
        self.config = config
        self.name: str = config.model_fields["kind"].default

    def check_requirements(self, config: RunConfig) -> None:
        """Raise the ``ImportError`` naming the extra of the first missing optional dependency, or a ``ValueError``
        for an augmentation or normalisation setting (``data.augment_shift``, ...) the kind does not read."""
        defaults = {"augment_shift": 0, "augment_flip": False, "normalization": "centered"}
        for field, default in defaults.items():
            if getattr(config.data, field) != default and field not in self.augmentations:
                raise ValueError(
                    f"data.{field}: augments or normalises classifier inputs; a {self.family} does not read it"
                )
        for module, extra, feature in self.requires:
            require(module, extra, feature)

    def _unsupported(self, step: str, hint: str = "") -> UnsupportedOperation:
        return UnsupportedOperation(f"model kind {self.name!r} ({self.family}) cannot {step}{hint}")

    def load_data(self, config: RunConfig) -> RunData:
        """Training and test data the kind trains on."""
        raise NotImplementedError

    def build(self, config: RunConfig, data: RunData) -> nn.Module:
        """The untrained model for data of this shape; the module trained and checkpointed.

        The sizes are checked before they are allocated: a model whose parameters and buffers would take more
        than :func:`parameter_budget` bytes is refused with a ``ValueError`` naming the kind, the count and the
        budget (:class:`ParameterBudget`).
        """
        with ParameterBudget(self.name):
            return self.construct(config, data)

    def construct(self, config: RunConfig, data: RunData) -> nn.Module:
        """Build the model (the kind's step behind :meth:`build`, which checks its size first)."""
        raise NotImplementedError

    def objective(self, model: nn.Module, config: RunConfig) -> nn.Module:
        """The training objective (:mod:`invertnet.training.objectives`) of the built model."""
        raise NotImplementedError

    def finish(self, model: nn.Module, config: RunConfig, run_dir: Path, data: RunData) -> dict[str, Any]:
        """Evaluate a trained model (eval mode, EMA weights in place), write its figures; the run's summary."""
        raise NotImplementedError

    def invert(self, model: nn.Module, config: RunConfig, data: RunData) -> dict[str, Any]:
        """Reconstruction of test data through the model's inverse."""
        raise self._unsupported("invert", ": it is not invertible")

    def sample(self, model: nn.Module, n: int) -> Tensor:
        """``n`` samples of a generative model."""
        raise self._unsupported("sample", ": it is not a generative model")

    def invertible_part(self, model: nn.Module) -> nn.Module:
        """The invertible network whose residual blocks ``certify`` checks."""
        raise self._unsupported("certify", ": it has no residual blocks")

    def certify(self, model: nn.Module, data: RunData) -> Certificate:
        """Certificates of every residual block (thesis Remark 4.9) on a batch of test inputs."""
        from invertnet.analysis import certify
        from invertnet.layers import InvertibleResidual

        part = self.invertible_part(model)
        if not any(isinstance(module, InvertibleResidual) for module in part.modules()):
            raise self._unsupported("certify", ": it has no residual blocks (its inverse needs no Lip(g) < 1)")
        return certify(part, data.test_inputs[:16])

    def metameric_classifier(self, model: nn.Module) -> nn.Module:
        """The fully invertible classifier (thesis Def. 6.7) of a trained model, for metameric sampling."""
        raise self._unsupported("draw metameric samples", ": it needs a fully_invertible_classifier")


def parameter_budget() -> float:
    """The most bytes of parameters and buffers a run may build: ``$INVERTNET_MAX_PARAMETER_BYTES`` when set (a
    positive number such as ``8e9``), else :data:`DEFAULT_PARAMETER_BUDGET`.

    Raises:
        ValueError: The variable is set to something other than a positive number.
    """
    text = os.environ.get(PARAMETER_BUDGET_VARIABLE)
    if text is None:
        return DEFAULT_PARAMETER_BUDGET
    try:
        budget = float(text)
    except ValueError:
        budget = math.nan
    if not 0 < budget < math.inf:
        raise ValueError(f"{PARAMETER_BUDGET_VARIABLE}: expected a positive number of bytes such as 8e9, got {text!r}")
    return budget


_FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint})
_NEW_FACTORIES = frozenset({Tensor.new_empty, Tensor.new_zeros, Tensor.new_ones, Tensor.new_full})


class ParameterBudget(TorchFunctionMode):
    """Within this mode, tensor factories (``torch.empty``, ``zeros``, ``randn``, ..., ``Tensor.new_*``) add up the
    bytes they are asked for, and the call that would take the total above ``budget`` raises a ``ValueError``
    naming ``kind``, the count so far and the budget, before anything is allocated.

    Building a model creates its parameters and buffers with these factories (``nn.Linear`` and ``nn.Conv2d`` call
    ``torch.empty``), so the total is the model's size up to small temporaries; for every embedded config it is
    within 1% of the parameters' and buffers' bytes, or below them (MintNet's masks are not built by factories).

    Arguments:
        kind: The model kind named in the message.
        budget: Most bytes (default :func:`parameter_budget`).
    """

    def __init__(self, kind: str, budget: float | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.budget = parameter_budget() if budget is None else budget
        self.requested = 0
        self.elements = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        kwargs = kwargs or {}
        if func in _FACTORIES or func in _NEW_FACTORIES:
            self._add(func, args, kwargs)
        return func(*args, **kwargs)

    def _add(self, func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            shape = _factory_shape(func, args, kwargs)
        except (TypeError, ValueError, IndexError):  # arguments torch itself will refuse, by its own message
            return
        dtype = kwargs.get("dtype") or _default_dtype(func, args)
        elements = math.prod(shape)
        self.elements += elements
        self.requested += elements * dtype.itemsize
        if self.requested > self.budget:
            raise ValueError(
                f"model kind {self.kind!r}: these settings ask for more than {self.elements:,} parameters and "
                f"buffers ({self.requested:.3g} bytes, refused before allocating the tensor of shape {shape}), "
                f"above the budget of {self.budget:.3g} bytes; lower the model's sizes (widths, blocks, layers) or "
                f"raise the budget with the environment variable {PARAMETER_BUDGET_VARIABLE}"
            )


def _default_dtype(func: Callable[..., Tensor], args: tuple[Any, ...]) -> torch.dtype:
    """The dtype a factory call makes without a ``dtype`` keyword: the tensor's for ``Tensor.new_*``, int64 for
    ``torch.randint``, else the default floating-point dtype."""
    if func in _NEW_FACTORIES:
        return args[0].dtype
    return torch.int64 if func is torch.randint else torch.get_default_dtype()


def _factory_shape(func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
    """The shape a factory call asks for: ``torch.zeros(2, 3)``, ``torch.zeros((2, 3))``, ``torch.full((2, 3),
    v)``, ``torch.randint(low, high, (2, 3))``, ``x.new_zeros((2, 3))`` or the keyword ``size``."""
    if "size" in kwargs:
        size = kwargs["size"]
    elif func in _NEW_FACTORIES:
        size = args[1:] if func is not Tensor.new_full else args[1]
    elif func is torch.full:
        size = args[0]
    elif func is torch.randint:
        size = args[-1]
    else:
        size = args
    if len(size) == 1 and not isinstance(size[0], int):  # one tuple / torch.Size rather than the sizes
        size = size[0]
    return tuple(int(side) for side in size)
