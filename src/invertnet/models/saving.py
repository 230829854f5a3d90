r"""Save and load models the library builds: architecture as JSON, weights as safetensors, no pickle.

Every builder (``dense_iresnet_flow``, ``mintnet_flow``, ``glow_flow``, ``iresnet_classifier``, ...) and every model
class with plain constructor arguments (``IsotopeNet``, ``DCGANGenerator``, ...) is registered with
:func:`saveable`, which records on the model the call that built it. :func:`save` writes one ``.safetensors``
file: the state dict (parameters and buffers: spectral-norm vectors, ActNorm's initialisation flag) as tensors,
and in its metadata the builder's name and keyword arguments as JSON, the dtype, the mode, the invertnet version
and a SHA-256 digest of all of it. :func:`load` rebuilds the model by calling the builder with those arguments,
loads the tensors (strictly) and checks the digest, so a truncated file, an edited tensor or an edited
architecture is refused by name, as is a builder this invertnet does not know. Nothing is unpickled: the
arguments are JSON, and estimators (``PowerSeriesLogDet(5)``) are written as their class name and arguments.

A model assembled by hand (``FlowDistribution(InvertibleSequential(...), base)``) has no builder call to record:
:func:`save` refuses it and says to save its ``state_dict`` with the code that builds it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from invertnet._files import save_tensors, write_atomically_with
from invertnet.logdet import DenseExactLogDet, ExactLogDet, PowerSeriesLogDet, UnbiasedLogDet

__all__ = ["BUILDERS", "load", "save", "saveable"]

FORMAT = 1
"""Layout of the metadata; a file of another format is refused by name."""

BUILDERS: dict[str, Callable[..., nn.Module]] = {}
"""The registered builders and classes by name: what :func:`load` may call."""

_ESTIMATORS: dict[str, type] = {
    cls.__name__: cls for cls in (PowerSeriesLogDet, UnbiasedLogDet, ExactLogDet, DenseExactLogDet)
}
_RECORD = "_invertnet_builder_call"
_METADATA_KEY = "invertnet_model"
_DIGEST_KEY = "invertnet_digest"

Constructor = TypeVar("Constructor", bound=Callable[..., Any])


def saveable(constructor: Constructor) -> Constructor:
    """Register a builder function or a model class for :func:`save` / :func:`load` under its name.

    The returned builder (or the class, whose ``__init__`` is wrapped) records on each model it makes the name
    and the bound arguments (defaults filled in) it was called with. Arguments must be JSON values, tuples,
    or the library's log-det estimators; others make :func:`save` raise a ``TypeError`` naming them.
    """
    name = constructor.__name__
    if name in BUILDERS:
        raise ValueError(f"saveable: a builder named {name!r} is registered already")
    if isinstance(constructor, type):
        original_init = constructor.__init__
        signature = inspect.signature(original_init)

        @functools.wraps(original_init)
        def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:  # noqa: N807 (the wrapped __init__)
            original_init(self, *args, **kwargs)
            if type(self) is constructor:  # a subclass records its own call, if registered
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop(next(iter(signature.parameters)))  # self
                object.__setattr__(self, _RECORD, (name, arguments))

        constructor.__init__ = __init__  # type: ignore[misc]
        BUILDERS[name] = constructor
        return constructor

    signature = inspect.signature(constructor)

    @functools.wraps(constructor)
    def build(*args: Any, **kwargs: Any) -> nn.Module:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        model = constructor(*args, **kwargs)
        object.__setattr__(model, _RECORD, (name, dict(bound.arguments)))
        return model

    BUILDERS[name] = build
    return build  # type: ignore[return-value]


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (built by a registered builder) to one safetensors file at ``path``, atomically.

    Returns:
        The path written.

    Raises:
        TypeError: The model was not built by a registered builder, or an argument of its builder call is not
            a JSON value, a tuple or a log-det estimator of the library.
    """
    record = getattr(model, _RECORD, None)
    if record is None:
        raise TypeError(
            f"invertnet.save: this {type(model).__name__} was not made by one of invertnet's builders "
            f"({', '.join(sorted(BUILDERS))}), so its architecture cannot be recorded; save its state_dict with "
            "torch.save or safetensors beside the code that builds it"
        )
    name, arguments = record
    encoded = {key: _encode(value, f"{name}({key}=...)") for key, value in arguments.items()}
    floating = next((p.dtype for p in model.state_dict().values() if p.is_floating_point()), torch.float32)
    architecture = {
        "format": FORMAT,
        "builder": name,
        "arguments": encoded,
        "dtype": str(floating).removeprefix("torch."),
        "training": model.training,
        "invertnet_version": _version(),
    }
    text = json.dumps(architecture, sort_keys=True)
    tensors = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    metadata = {_METADATA_KEY: text, _DIGEST_KEY: _digest(text, tensors)}
    path = Path(path)
    return write_atomically_with(path, lambda partial: save_tensors(tensors, partial, metadata))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model :func:`save` wrote to ``path``, on ``map_location``, in the mode it was saved in.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a readable safetensors file (truncated, not safetensors), holds no invertnet
            model, is of another format, names a builder this invertnet does not know, or its tensors or
            architecture were changed after it was written (the digest disagrees), or its tensors do not fit the
            architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"invertnet.load: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"invertnet.load: {path} is not a readable safetensors file ({error})") from error
    if _METADATA_KEY not in metadata:
        raise ValueError(f"invertnet.load: {path} holds no invertnet model (no {_METADATA_KEY!r} metadata)")
    text = metadata[_METADATA_KEY]
    if metadata.get(_DIGEST_KEY) != _digest(text, tensors):
        raise ValueError(
            f"invertnet.load: {path} was changed after it was written: the SHA-256 digest of its architecture and "
            "tensors does not match the one recorded (an edited or partly overwritten file)"
        )
    try:
        architecture = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"invertnet.load: {path}: the architecture is not valid JSON ({error})") from error
    if architecture.get("format") != FORMAT:
        found = architecture.get("format")
        raise ValueError(f"invertnet.load: {path} has format {found!r}; this invertnet reads format {FORMAT}")
    name = architecture.get("builder")
    if name not in BUILDERS:
        raise ValueError(
            f"invertnet.load: {path} was built by {name!r}, which this invertnet does not know "
            f"(known: {', '.join(sorted(BUILDERS))})"
        )
    arguments = {key: _decode(value, path) for key, value in architecture["arguments"].items()}
    model = BUILDERS[name](**arguments)
    model.to(dtype=getattr(torch, architecture["dtype"]))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(f"invertnet.load: {path}: the tensors do not fit the architecture ({error})") from error
    return model.to(map_location).train(bool(architecture["training"]))


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Generator):  # seeds only the initialisation, which the saved weights replace
        return None
    if isinstance(value, tuple):
        return {"tuple": [_encode(item, where) for item in value]}
    if isinstance(value, list):
        return [_encode(item, where) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {"dict": {key: _encode(item, where) for key, item in value.items()}}
    if type(value).__name__ in _ESTIMATORS and type(value) is _ESTIMATORS[type(value).__name__]:
        parameters = [
            name
            for name, parameter in inspect.signature(type(value)).parameters.items()
            if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        ]
        return {"estimator": type(value).__name__, "arguments": {p: getattr(value, p) for p in parameters}}
    raise TypeError(
        f"invertnet.save: the argument {where} is a {type(value).__name__}, which cannot be recorded as JSON "
        "(numbers, strings, booleans, None, lists, tuples, dicts and the library's log-det estimators can)"
    )


def _decode(value: Any, path: Path) -> Any:
    if isinstance(value, list):
        return [_decode(item, path) for item in value]
    if not isinstance(value, dict):
        return value
    if "tuple" in value:
        return tuple(_decode(item, path) for item in value["tuple"])
    if "dict" in value:
        return {key: _decode(item, path) for key, item in value["dict"].items()}
    estimator = _ESTIMATORS.get(value.get("estimator"))
    if estimator is None:
        raise ValueError(f"invertnet.load: {path}: unknown encoded argument {value!r}")
    return estimator(**value["arguments"])


def _digest(text: str, tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the architecture's JSON and every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256(text.encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _version() -> str:
    from invertnet import __version__

    return __version__
