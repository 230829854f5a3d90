r"""Memory-saving training: reconstruct activations by inversion instead of storing them (as RevNets do).

Ordinary backpropagation through a composition :math:`F = f_T \circ \dots \circ f_1` keeps every part's
intermediate tensors until the backward pass, so training memory grows with the depth T. An invertible part
does not need them: its input can be recomputed from its output. :class:`MemorySavingSequential` keeps only
the composition's input and output, and in the backward pass walks the parts from last to first, inverting
each part to recover its input, re-running that one part with a graph and backpropagating through it.
Activation memory is then that of one part, whatever T is.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from invertnet.core import InvertibleModule, InvertibleSequential, check_input
from invertnet.layers.spectral import SpectralNormLayer

__all__ = ["MemorySavingSequential", "saved_activation_bytes"]

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class _RngState:
    """The CPU generator's state and that of each CUDA device in use."""

    cpu: Tensor
    cuda: tuple[Tensor, ...]

    @classmethod
    def capture(cls, devices: list[torch.device]) -> _RngState:
        return cls(torch.get_rng_state(), tuple(torch.cuda.get_rng_state(device) for device in devices))

    def restore(self, devices: list[torch.device]) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in zip(devices, self.cuda, strict=True):
            torch.cuda.set_rng_state(state, device)

    def same_as(self, other: _RngState) -> bool:
        return torch.equal(self.cpu, other.cpu) and all(
            torch.equal(mine, theirs) for mine, theirs in zip(self.cuda, other.cuda, strict=True)
        )


@dataclass
class _PartRecord:
    """What the backward pass needs to replay one part's forward exactly.

    Attributes:
        buffers: References to the part's buffers right after its forward (power-iteration vectors are
            replaced, not modified, by each step, so this costs no memory unless the model runs again).
        initial_buffers: References to the buffers before the forward, kept only when the forward drew random
            numbers and resized a buffer (lazily sized state, e.g. power-iteration vectors drawn on the first
            input): the recomputation then starts from this state in the part's own mode, so it draws the
            sizing's random numbers again and the estimator's draws line up with the forward's.
        rng: Generator states before and after the forward, kept only when the forward drew random numbers.
    """

    buffers: dict[str, Tensor]
    initial_buffers: dict[str, Tensor] | None
    rng: tuple[_RngState, _RngState] | None


def _assign_buffers(module: nn.Module, buffers: dict[str, Tensor]) -> None:
    for name, tensor in buffers.items():
        owner, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(owner), attribute, tensor)


@contextmanager
def _as_in_forward(part: nn.Module, record: _PartRecord, from_start: bool) -> Iterator[None]:
    """``part`` in the state its forward left, with spectral normalisation frozen so that it uses the normalised
    weights the forward used; or, with ``from_start`` and a recorded initial state, in the state its forward
    started from and in its own mode, so that it repeats the forward's state updates and random draws.
    Restores the current buffers afterwards."""
    current = dict(part.named_buffers())
    start = record.initial_buffers if from_start else None
    spectral = [m for m in part.modules() if isinstance(m, SpectralNormLayer) and m.training]
    frozen = spectral if start is None else []
    _assign_buffers(part, record.buffers if start is None else start)
    for module in frozen:
        module.training = False
    try:
        yield
    finally:
        for module in frozen:
            module.training = True
        _assign_buffers(part, current)


@contextmanager
def _replayed_rng(rng: tuple[_RngState, _RngState] | None, devices: list[torch.device], where: str) -> Iterator[None]:
    """Run the body from the generator state ``rng[0]`` without disturbing the global state; warn when the body
    does not end in ``rng[1]`` (it drew other random numbers than the forward did)."""
    if rng is None:
        yield
        return
    before, after = rng
    with torch.random.fork_rng(devices=devices):
        before.restore(devices)
        yield
        same = after.same_as(_RngState.capture(devices))
    if not same:
        warnings.warn(
            f"MemorySavingSequential: {where} drew different random numbers when recomputed in the backward pass "
            "than in the forward pass; its gradient uses other random draws (e.g. Hutchinson probes) than the "
            "value it returned",
            RuntimeWarning,
            stacklevel=2,
        )


class _MemorySavingFunction(torch.autograd.Function):
    """Forward without a graph, saving the input and output; backward by inversion and recomputation."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, module: MemorySavingSequential, with_log_det: bool, x: Tensor, *parameters: Tensor
    ) -> tuple[Tensor, Tensor]:
        devices = [x.device] if x.is_cuda else []
        total = x.new_zeros(x.shape[0])
        records: list[_PartRecord] = []
        anchors: dict[int, Tensor] = {}
        state = _RngState.capture(devices) if module.preserve_rng_state else None
        for index, part in enumerate(module.parts):
            if index == 0 or part.quantized_inverse:
                anchors[index] = x
            before = dict(part.named_buffers())
            if with_log_det:
                x, log_det = part.forward_and_log_det(x)
                total = total + log_det
            else:
                x = part(x)
            after = dict(part.named_buffers())
            resized = any(name in before and before[name].shape != tensor.shape for name, tensor in after.items())
            following = _RngState.capture(devices) if module.preserve_rng_state else None
            rng = None if state is None or following is None or state.same_as(following) else (state, following)
            records.append(_PartRecord(after, before if resized and rng is not None else None, rng))
            state = following
        ctx.module, ctx.with_log_det, ctx.devices = module, with_log_det, devices
        ctx.records, ctx.anchor_indices = records, list(anchors)
        position = {id(parameter): index for index, parameter in enumerate(parameters)}
        ctx.parameters = parameters  # recomputation uses these, even if the module's were swapped since
        ctx.part_parameters = [
            [(name, position[id(p)]) for name, p in part.named_parameters() if id(p) in position]
            for part in module.parts
        ]
        ctx.save_for_backward(*anchors.values(), x)
        if not with_log_det:
            ctx.mark_non_differentiable(total)
        return x, total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, grad_log_det: Tensor) -> tuple[Tensor | None, ...]:
        *anchor_values, y = ctx.saved_tensors
        anchors = dict(zip(ctx.anchor_indices, anchor_values, strict=True))
        parts = list(ctx.module.parts)
        # a part's input needs a cotangent when the sequence's input does or an earlier part has parameters
        needs_cotangent = [ctx.needs_input_grad[2]]
        for named in ctx.part_parameters[:-1]:
            needs_cotangent.append(needs_cotangent[-1] or bool(named))
        gradients: dict[int, Tensor] = {}
        cotangent = grad_y
        for index in reversed(range(len(parts))):
            part, record, named = parts[index], ctx.records[index], ctx.part_parameters[index]
            where = f"part {index} ({type(part).__name__})"
            leaves = [ctx.parameters[position].detach().requires_grad_(True) for _, position in named]
            replaced = {name: leaf for (name, _), leaf in zip(named, leaves, strict=True)}
            if index in anchors:
                x = anchors[index].detach()
            else:
                with torch.no_grad(), _as_in_forward(part, record, from_start=False), _swapped(part, replaced):
                    x = part.inverse(y).detach()
            if needs_cotangent[index]:
                x.requires_grad_(True)
            inputs = ([x] if x.requires_grad else []) + leaves
            if not inputs:
                break
            with torch.enable_grad(), _as_in_forward(part, record, from_start=True), _swapped(part, replaced):
                with _replayed_rng(record.rng, ctx.devices, where):
                    outputs = part.forward_and_log_det(x) if ctx.with_log_det else (part(x), None)
            pairs = [
                (output, grad)
                for output, grad in zip(outputs, (cotangent, grad_log_det), strict=True)
                if output is not None and output.requires_grad
            ]
            results: tuple[Tensor | None, ...] = (None,) * len(inputs)
            if pairs:
                outs, grads = zip(*pairs, strict=True)
                results = torch.autograd.grad(outs, inputs, grads, allow_unused=True)
            if x.requires_grad:
                cotangent = torch.zeros_like(x) if results[0] is None else results[0]
                results = results[1:]
            for (_, position), gradient in zip(named, results, strict=True):
                if gradient is not None:  # a parameter shared by several parts sums their contributions
                    gradients[position] = gradient + gradients[position] if position in gradients else gradient
            y = x.detach()
        input_gradient = cotangent if ctx.needs_input_grad[2] else None
        return (None, None, input_gradient, *(gradients.get(index) for index in range(len(ctx.parameters))))


@contextmanager
def _swapped(part: nn.Module, tensors: dict[str, Tensor]) -> Iterator[None]:
    """``part`` with the named parameters replaced by ``tensors`` (the forward's values), restored afterwards."""
    previous = {}
    for name, tensor in tensors.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = part.get_submodule(owner_name)
        previous[name] = owner._parameters[attribute]
        owner._parameters[attribute] = tensor
    try:
        yield
    finally:
        for name, tensor in previous.items():
            owner_name, _, attribute = name.rpartition(".")
            part.get_submodule(owner_name)._parameters[attribute] = tensor


class MemorySavingSequential(InvertibleSequential):
    r"""An :class:`~invertnet.InvertibleSequential` whose backward pass reconstructs activations by inversion.

    Same parts, same maps, same ``state_dict`` keys as the ordinary composition (checkpoints load into either),
    and the same inverse (inherited). Only the gradient computation differs: instead of storing every part's
    activations for backward, the forward keeps the input x and the output y and nothing else.

    Algorithm. With gradients enabled, :meth:`forward_and_log_det` (and :meth:`forward`) run every part
    without a graph, recording for each part whether it drew random numbers (then the generator states, CPU
    and the input's CUDA device, as ``torch.utils.checkpoint``'s ``preserve_rng_state`` does) and references to
    its buffers. The backward pass receives the cotangents :math:`\bar y` of y (B, ...) and :math:`\bar\ell`
    of the summed log-det (B,), and for t = T, ..., 1:

    1. reconstruct the part's input :math:`x_{t-1} = f_t^{-1}(y_t)` without a graph (exact or iterative
       inverse at the part's default tolerances; a failed solve raises :class:`~invertnet.ConvergenceError`
       here). The first part's input is the saved x, so a leading dequantisation is never inverted;
    2. recompute :math:`(y_t, \ell_t) = f_t(x_{t-1})` with a graph, from the generator state its forward
       started from (so Hutchinson probes, roulette lengths and dequantisation noise are the same draws;
       the global generator state is left as it was) and with the normalised weights its forward used:
       spectral normalisation is frozen at the power-iteration vectors the forward left, so the
       recomputation takes no extra power step. A stochastic part whose forward sized lazily initialised
       state (power-iteration vectors drawn on the first input) is instead replayed from its state before
       the forward, drawing the same vectors again. A recomputation that draws other random numbers than
       its forward did raises a ``RuntimeWarning``;
    3. backpropagate :math:`\bar y_t` through :math:`y_t` and the same :math:`\bar\ell` through
       :math:`\ell_t` (the log-det of the composition is the sum of the parts'), accumulating the parameter
       gradients and passing :math:`\bar y_{t-1} = \bar x_{t-1}` on; then drop the part's graph.

    The parameters are inputs of one ``torch.autograd.Function``, so their gradients arrive through autograd
    (accumulated into ``.grad``, hooks and DistributedDataParallel work as usual), and x receives its gradient
    when it requires one. Without gradients (``torch.no_grad()``, evaluation) the parts run as usual.

    Costs and limits:

    * Memory: the input and output of the composition, the activations of one part during backward (a part is
      a top-level part: a :class:`~invertnet.layers.MintBlock` is recomputed as a whole) and about 10 KB of
      generator state per part that draws random numbers. Inputs of parts with quantising inverses
      (:class:`~invertnet.layers.UniformDequantization` after the first part) are kept as well.
    * Time: one extra inverse and one extra forward per part in the backward pass; measured 2.0-2.3x the
      time of an ordinary training step (``benchmarks/memory_saving.py``).
    * Accuracy: the reconstruction error of iterative inverses (their tolerance, 1e-5 in float32; errors
      propagate back through the earlier inverses) perturbs the gradients slightly. In float64 they agree with
      ordinary backpropagation to 1e-10 or better; in float32 the benchmark measured relative differences of
      1e-5 to 2e-4 at initialisation. Tighten a layer's ``atol``/``rtol`` if that matters.
    * The backward pass recomputes with the parameter tensors the forward used (saved by reference), so a
      module whose parameters are swapped or replaced between forward and backward still gets the right gradients.
    * The log-det must be the sum of per-part log-dets (true of every composition here); only first
      derivatives are available (no ``create_graph`` through the backward pass).
    * Conditional flows work at their contexts (``flow.log_prob(x, context=c)``), with gradients for the
      parameters and x; a context that requires a gradient (an encoder's output) is refused.
    * Layers whose training-mode output depends on batch statistics
      (:class:`~invertnet.layers.InvertibleBatchNorm`) are refused in training mode: their inverse uses the
      running averages, so it cannot reconstruct their input. ActNorm's data-dependent initialisation works.

    Arguments:
        *modules: The parts, as for :class:`~invertnet.InvertibleSequential`; to convert a flow, pass the parts
            of its transform (see the example).
        preserve_rng_state: Replay each stochastic part's random draws in the backward pass, so the gradient is
            the gradient of the value returned. With ``False``, recomputations draw fresh random numbers and the
            gradient belongs to another sample of the estimator.

    Examples:
        >>> from invertnet.models import dense_iresnet_flow
        >>> flow = dense_iresnet_flow(2, n_blocks=4, hidden_features=8)
        >>> flow.transform = MemorySavingSequential(*flow.transform)
        >>> flow.bits_per_dim(torch.randn(16, 2)).mean().backward()
        >>> all(p.grad is not None for p in flow.parameters())
        True
    """

    def __init__(self, *modules: InvertibleModule, preserve_rng_state: bool = True) -> None:
        super().__init__(*modules)
        self.preserve_rng_state = preserve_rng_state

    def _trainable(self) -> list[Tensor]:
        return [p for p in self.parameters() if p.requires_grad]

    def _check_reconstructible(self) -> None:
        for index, part in enumerate(self.parts):
            for module in part.modules():
                if isinstance(module, InvertibleModule) and module.training and module.batch_statistics_in_training:
                    raise ValueError(
                        f"MemorySavingSequential: part {index} ({type(part).__name__}) contains a "
                        f"{type(module).__name__} in training mode; its output depends on the batch statistics and "
                        "its inverse uses the running averages, so its input cannot be reconstructed. Use ActNorm, "
                        "put that layer in eval mode, or train with an ordinary InvertibleSequential"
                    )

    def _check_contexts(self) -> None:
        """Refuse contexts that need gradients: the backward pass reaches the parameters and x only."""
        for module in self.modules():
            context = getattr(module, "context", None)
            if isinstance(context, Tensor) and context.requires_grad:
                raise ValueError(
                    f"{type(self).__name__}: the context of {type(module).__name__} requires a gradient, which the "
                    "memory-saving backward pass does not compute (it reaches the parameters and the input only); "
                    "detach the context (labels need no gradient) or use an ordinary InvertibleSequential"
                )

    def _memory_saving(self, x: Tensor, with_log_det: bool) -> tuple[Tensor, Tensor]:
        check_input(x, None, f"{type(self).__name__}.forward")
        self._check_reconstructible()
        self._check_contexts()
        return _MemorySavingFunction.apply(self, with_log_det, x, *self._trainable())

    def _needs_graph(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def forward(self, x: Tensor) -> Tensor:
        """y = F(x) for x of shape (B, ...); the backward pass reconstructs activations (no log-dets computed)."""
        if not self._needs_graph(x):
            return super().forward(x)
        return self._memory_saving(x, with_log_det=False)[0]

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log_det)`` with log_det of shape (B,) the sum of the parts'; backward by reconstruction."""
        if not self._needs_graph(x):
            return super().forward_and_log_det(x)
        return self._memory_saving(x, with_log_det=True)

    def extra_repr(self) -> str:
        return f"preserve_rng_state={self.preserve_rng_state}"


class _Saved:
    """A tensor packed by :func:`saved_activation_bytes`; alive exactly as long as the graph that saved it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def saved_activation_bytes(fn: Callable[[], T], model: nn.Module | None = None) -> tuple[T, int]:
    """Run ``fn()`` and return its result with the bytes its autograd graph keeps for the backward pass.

    Every tensor saved for backward while ``fn`` runs passes through ``torch.autograd.graph.saved_tensors_hooks``;
    counted are the distinct storages of those still held by a graph when ``fn`` returns (graphs built and
    freed inside ``fn`` are not), except storages of ``model``'s parameters and buffers, which exist anyway.
    Keep the result alive until the backward pass: it holds the graph.

    Examples:
        >>> x = torch.randn(8, 4, requires_grad=True)
        >>> _, size = saved_activation_bytes(lambda: (x.exp() ** 2).sum())
        >>> size  # exp saves its output and pow its input: the same 8 x 4 floats
        128
    """
    packed: list[weakref.ref[_Saved]] = []

    def pack(tensor: Tensor) -> _Saved:
        saved = _Saved(tensor.detach())  # holding the tensor itself would tie saved outputs to their own graph
        packed.append(weakref.ref(saved))
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        result = fn()
    gc.collect()
    state = [] if model is None else [*model.parameters(), *model.buffers()]
    excluded = {(t.device, t.untyped_storage().data_ptr()) for t in state}
    sizes: dict[tuple[torch.device, int], int] = {}
    for reference in packed:
        saved = reference()
        if saved is None:
            continue
        storage = saved.tensor.untyped_storage()
        key = (saved.tensor.device, storage.data_ptr())
        if key not in excluded:
            sizes[key] = storage.nbytes()
    return result, sum(sizes.values())
