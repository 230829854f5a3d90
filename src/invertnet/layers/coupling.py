r"""Coupling layers (Dinh et al. 2017, section 3.3) and the affine ones: RealNVP (3.3-3.5) and Glow's scale
(Kingma & Dhariwal 2018, Table 1).

A coupling layer splits the input by a binary mask b into a conditioning part x_a (b = 1), passed through
unchanged, and a transformed part x_b (b = 0), each entry of which goes through a monotone map with parameters
computed from x_a; the affine map scales and shifts:

.. math:: y_a = x_a, \qquad y_b = x_b \odot \sigma(x_a) + t(x_a), \qquad
    \log|\det J| = \sum_b \log \sigma_b(x_a).

The Jacobian is triangular once the positions are ordered a before b, so the log-det is exact and the
inverse x_b = (y_b - t(y_a)) / sigma(y_a) is closed-form. Vector masks and channel masks of images split the
input along dimension 1 and the conditioner sees only x_a (``split`` layout); spatial masks of images
(checkerboard) keep the shape and the conditioner sees b * x (``masked`` layout, Dinh et al. 2017, Eq. 9).
:class:`Coupling` holds the masks, layouts and contexts; :class:`AffineCoupling` and
:class:`~invertnet.layers.SplineCoupling` (rational-quadratic splines) are its maps.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertnet.core import InvertibleModule, SolverOptions, check_input
from invertnet.layers.conditional import ContextInput, ContextSpec, check_context, context_shape

__all__ = ["AffineCoupling", "Coupling", "coupling_mask", "default_conditioner"]

Scale = Literal["exp", "sigmoid"]
MaskName = Literal["half", "alternating", "channel", "checkerboard"]
_VECTOR_MASKS = ("half", "alternating")
_IMAGE_MASKS = ("channel", "checkerboard")

#: Glow's offset of the scale's pre-activation: sigmoid(h + 2) is about 0.88 when h = 0 (Kingma & Dhariwal's code).
GLOW_SCALE_OFFSET = 2.0


def coupling_mask(event_shape: tuple[int, ...], mask: MaskName, flip: bool = False) -> Tensor:
    """A boolean mask of shape ``event_shape``: True at the conditioning positions x_a, False at those transformed.

    Vectors (d,): ``"half"`` conditions on the first d // 2 features, ``"alternating"`` on the even-indexed ones.
    Images (C, H, W): ``"channel"`` conditions on the first C // 2 channels, ``"checkerboard"`` on the pixels with
    even row + column (Dinh et al. 2017, Fig. 3). ``flip`` swaps the two parts.

    Examples:
        >>> coupling_mask((4,), "alternating")
        tensor([ True, False,  True, False])
        >>> coupling_mask((1, 2, 2), "checkerboard", flip=True)[0]
        tensor([[False,  True],
                [ True, False]])
    """
    shape = tuple(int(size) for size in event_shape)
    if len(shape) == 1 and mask in _VECTOR_MASKS:
        index = torch.arange(shape[0])
        chosen = index < shape[0] // 2 if mask == "half" else index % 2 == 0
    elif len(shape) == 3 and mask in _IMAGE_MASKS:
        channels, height, width = shape
        if mask == "channel":
            chosen = (torch.arange(channels) < channels // 2).view(-1, 1, 1).expand(shape)
        else:
            rows, columns = torch.arange(height).view(-1, 1), torch.arange(width).view(1, -1)
            chosen = ((rows + columns) % 2 == 0).expand(shape)
    else:
        kinds = "'half' or 'alternating'" if len(shape) == 1 else "'channel' or 'checkerboard'"
        if len(shape) not in (1, 3):
            raise ValueError(f"coupling_mask: event_shape must be (d,) or (C, H, W), got {shape}")
        raise ValueError(f"coupling_mask: mask {mask!r} does not apply to event shape {shape}; use {kinds}")
    return chosen != flip


def _validated_mask(mask: Tensor, event_shape: tuple[int, ...], name: str) -> Tensor:
    """The user's mask as booleans, refusing a wrong shape, values other than 0 / 1 and an empty part."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: mask must be a name or a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != event_shape:
        raise ValueError(f"{name}: the mask has shape {tuple(mask.shape)}, the event shape is {event_shape}")
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{name}: mask entries must be 0 / 1 (or booleans): 1 marks the conditioning part")
        mask = mask != 0
    n_conditioning = int(mask.sum())
    if n_conditioning in (0, mask.numel()):
        part = "transformed" if n_conditioning else "conditioning"
        raise ValueError(
            f"{name}: the mask leaves the {part} part empty (it has {n_conditioning} of {mask.numel()} "
            "entries set); a coupling needs at least one position in each part"
        )
    return mask


def _split_channels(mask: Tensor) -> Tensor | None:
    """For a mask that is constant along every dimension after the first, its per-index pattern along dimension 1
    of the data (shape (C,) or (d,)); ``None`` for masks that vary in space."""
    flat = mask.reshape(mask.shape[0], -1)
    return flat[:, 0] if bool((flat == flat[:, :1]).all()) else None


def _zero_last(net: nn.Sequential) -> nn.Sequential:
    last = net[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return net


def default_conditioner(in_size: int, out_size: int, hidden: int, image: bool) -> nn.Sequential:
    """A small conditioner whose last layer is zero-initialised, so that it outputs 0 at initialisation.

    Vectors: Linear(in, hidden) - ReLU - Linear(hidden, hidden) - ReLU - Linear(hidden, out). Images: Glow's
    network (Kingma & Dhariwal 2018; the zero last layer of their section 3.3): Conv 3x3 (in -> hidden) - ReLU -
    Conv 1x1 - ReLU - Conv 3x3 (hidden -> out), padded to keep H and W; without the ActNorms and the learned
    output scale of Glow's code.
    """
    if image:
        return _zero_last(
            nn.Sequential(
                nn.Conv2d(in_size, hidden, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(hidden, hidden, 1),
                nn.ReLU(),
                nn.Conv2d(hidden, out_size, 3, padding=1),
            )
        )
    return _zero_last(
        nn.Sequential(
            nn.Linear(in_size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_size)
        )
    )


class Coupling(InvertibleModule):
    r"""A coupling layer: x_a passes unchanged, every entry of x_b goes through a monotone map whose parameters
    the conditioner computes from x_a (Dinh et al. 2017, section 3.3):

    .. math:: y_a = x_a, \qquad y_b = \tau(x_b; \theta(x_a)), \qquad
        \log|\det J| = \sum_b \log \tau'(x_b; \theta(x_a)).

    Subclasses say how many raw parameters P each transformed entry takes (``parameters_per_entry``) and apply
    the map entrywise (:meth:`transform_entries`): :class:`AffineCoupling` (P = 2, RealNVP and Glow) and
    :class:`~invertnet.layers.SplineCoupling` (P = 3K - 1, Durkan et al. 2019).

    Layouts. Vector masks and image masks constant over (H, W) (``"channel"``) split dimension 1: the conditioner
    maps x_a of shape (B, n_a, ...) to (B, P n_b, ...), parameter p of channel j at channel p n_b + j. Other image
    masks (``"checkerboard"``) use Dinh et al.'s Eq. 9: the conditioner maps b * x, shape (B, C, H, W), to
    (B, P C, H, W) and the entries at b = 1 are discarded.

    Arguments (shared by the subclasses):
        event_shape: (d,) for vectors, (C, H, W) for images.
        mask: ``"half"``, ``"alternating"`` (vectors), ``"channel"``, ``"checkerboard"`` (images; see
            :func:`coupling_mask`), or a 0 / 1 or boolean tensor of shape ``event_shape`` with 1 at x_a.
        flip: Swap the roles of the two parts of a named mask.
        conditioner: A module with the input and output shapes above (default: :func:`default_conditioner` with
            ``hidden`` units or channels). Zero-initialise its last layer to start at the identity.
        hidden: Width of the default conditioner.
        context_features: Size k of a context c (conditional flows): the conditioner sees (x_a, c), c appended
            to the vector or as k constant planes of an image (a custom conditioner takes those inputs); or, for
            images, the shape (C', H, W) of an image context at the layer's resolution
            (:func:`~invertnet.layers.context_shape_at`), whose C' channels the conditioner sees beside x_a. Use
            the layer through :meth:`at`. 0: unconditional.
    """

    #: Raw parameters of the entrywise map per transformed entry.
    parameters_per_entry: int = 2

    def __init__(
        self,
        event_shape: tuple[int, ...],
        mask: MaskName | Tensor = "half",
        *,
        flip: bool = False,
        conditioner: nn.Module | None = None,
        hidden: int = 64,
        context_features: ContextSpec = 0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        shape = context_shape(context_features, name)
        self.context_features = context_features if isinstance(context_features, int) else shape
        self.event_shape = tuple(int(size) for size in event_shape)
        if len(self.event_shape) not in (1, 3):
            raise ValueError(f"{name}: event_shape must be (d,) or (C, H, W), got {self.event_shape}")
        if len(shape) == 3 and (len(self.event_shape) != 3 or shape[1:] != self.event_shape[1:]):
            raise ValueError(
                f"{name}: an image context of shape {shape} needs an image event of the same height and "
                f"width, got event shape {self.event_shape}"
            )
        if hidden < 1:
            raise ValueError(f"{name}: hidden must be positive, got {hidden}")
        if isinstance(mask, str):
            chosen = coupling_mask(self.event_shape, mask, flip)  # type: ignore[arg-type]
            if not 0 < int(chosen.sum()) < chosen.numel():
                raise ValueError(
                    f"{name}: mask {mask!r} leaves one part empty for event shape {self.event_shape}; a "
                    "coupling needs at least one position in each part"
                )
        else:
            if flip:
                raise ValueError(f"{name}: flip applies to named masks; invert the tensor mask instead")
            chosen = _validated_mask(mask, self.event_shape, name)
        self.mask_name = mask if isinstance(mask, str) else "custom"
        pattern = _split_channels(chosen)
        self.layout = "split" if pattern is not None else "masked"
        image = len(self.event_shape) == 3
        if pattern is not None:
            conditioning = torch.nonzero(pattern).flatten()
            transformed = torch.nonzero(~pattern).flatten()
            order = torch.cat([conditioning, transformed])
            self.register_buffer("conditioning_index", conditioning, persistent=False)
            self.register_buffer("transformed_index", transformed, persistent=False)
            self.register_buffer("restore_index", torch.argsort(order), persistent=False)
            in_size, self.n_transformed = len(conditioning), len(transformed)
        else:
            in_size, self.n_transformed = self.event_shape[0], self.event_shape[0]
        self.register_buffer("mask", chosen, persistent=False)
        if conditioner is None:
            context_size = shape[0] if shape else 0
            outputs = self.parameters_per_entry * self.n_transformed
            conditioner = default_conditioner(in_size + context_size, outputs, hidden, image)
        self.conditioner = conditioner

    def _check(self, x: Tensor, where: str) -> None:
        check_input(x, self.event_shape, f"{type(self).__name__}.{where}")

    @property
    def conditional(self) -> bool:  # type: ignore[override]
        return bool(self.context_features)  # k > 0 or an image shape; a view at a context sets 0

    def at(self, context: Tensor) -> Coupling:
        """The coupling at the context c: its conditioner sees (x_a, c); shares this layer's parameters."""
        if not self.conditional:
            return self
        view = copy.copy(self)  # shares the parameters and buffers; its own table of submodules
        view._modules = {**self._modules, "conditioner": ContextInput(self.conditioner, context, self.context_features)}
        view.context_features = 0
        return view

    def _parameters_of(self, conditioning: Tensor) -> Tensor:
        """The raw parameters (B, P, n_b, ...) from the conditioner's output, after checking its shape."""
        name = type(self).__name__
        if self.context_features:
            check_context(None, self.context_features, name)  # raises: the layer needs its context
        h = self.conditioner(conditioning)
        count = self.parameters_per_entry
        expected = (conditioning.shape[0], count * self.n_transformed, *conditioning.shape[2:])
        if tuple(h.shape) != expected:
            raise ValueError(
                f"{name}: the conditioner maps {tuple(conditioning.shape)} to {tuple(h.shape)}, expected "
                f"{expected} ({count} parameters of each of the {self.n_transformed} transformed channels)"
            )
        return h.unflatten(1, (count, self.n_transformed))

    def transform_entries(self, x: Tensor, parameters: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """The entrywise monotone map tau of a subclass: what it implements.

        Arguments:
            x: The transformed entries x_b, shape (B, n, ...) (their images y_b when ``inverse``).
            parameters: The conditioner's raw parameters, shape (B, P, n, ...). In the masked layout they are 0
                at the conditioning positions, whose results are discarded: the map must be finite there.
            inverse: Apply tau^{-1} instead of tau.

        Returns:
            ``(out, log_derivative)``, both of x's shape: tau(x) (or tau^{-1}(y)) and log |tau'| at the forward
            map's input (x, or the preimage tau^{-1}(y) when ``inverse``).
        """
        raise NotImplementedError(
            f"{type(self).__name__}: Coupling is a base class; a subclass sets parameters_per_entry and implements "
            "transform_entries (see AffineCoupling, SplineCoupling)"
        )

    def _transform(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """y = F(x) (or x = F^{-1}(y) when ``inverse``) and log|det J_F|, shape (B,), at the same point."""
        if self.layout == "split":
            fixed = x.index_select(1, self.conditioning_index)
            moved, log_derivative = self.transform_entries(
                x.index_select(1, self.transformed_index), self._parameters_of(fixed), inverse
            )
            out = torch.cat([fixed, moved], dim=1).index_select(1, self.restore_index)
        else:
            free = (~self.mask).to(x.dtype)  # raw parameters 0 at x_a: finite maps there, then discarded
            fixed = x * self.mask.to(x.dtype)
            moved, log_derivative = self.transform_entries(x, self._parameters_of(fixed) * free, inverse)
            out = torch.where(self.mask, x, moved)
            log_derivative = log_derivative * free
        return out, log_derivative.flatten(1).sum(dim=1)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, "forward")
        return self._transform(x, inverse=False)

    def inverse_and_log_det(self, y: Tensor, options: SolverOptions | None = None) -> tuple[Tensor, Tensor]:
        self._check(y, "inverse")
        x, log_det = self._transform(y, inverse=True)
        return x, -log_det

    def extra_repr(self) -> str:
        return f"{self.event_shape}, mask={self.mask_name!r}, layout={self.layout!r}"


class AffineCoupling(Coupling):
    r"""Affine coupling layer (Dinh et al. 2017, sections 3.3-3.5, Eq. 4-9) with the RealNVP or Glow scale.

    With the mask b (1: conditioning part x_a) and the conditioner's output (h_t, h_s) = NN(x_a),

    .. math:: y_a = x_a, \quad y_b = x_b \odot \sigma + h_t, \quad \log|\det J| = \sum \log \sigma,

    where ``scale="exp"``: :math:`\log\sigma = c \tanh(h_s / c)`, the exponential of Dinh et al. 2017 (Eq. 5)
    with its log-scale softly bounded to (-c, c) by ``clamp`` = c (``None``: unbounded), and
    ``scale="sigmoid"``: :math:`\sigma = \mathrm{sigmoid}(h_s + 2)`, the scale of Kingma & Dhariwal's Glow code
    (their Table 1 writes the exponential). The inverse is x_b = (y_b - h_t) / sigma.

    Layouts and the conditioner are those of :class:`Coupling` with P = 2: of the conditioner's 2 n_b output
    channels the first n_b are h_t, the last n_b h_s. At initialisation the default conditioner outputs 0 (zero
    last layer), so the ``"exp"`` layer is the identity and the ``"sigmoid"`` layer scales x_b by
    sigmoid(2) = 0.881.

    Arguments:
        event_shape, mask, flip, conditioner, hidden, context_features: As :class:`Coupling`.
        scale: ``"exp"`` (RealNVP) or ``"sigmoid"`` (Glow).
        clamp: Bound c of the ``"exp"`` log-scale (``None``: unbounded); the ``"sigmoid"`` scale lies in
            (0, 1) and takes no clamp.

    Examples:
        >>> layer = AffineCoupling((4,), mask="half", hidden=8)
        >>> x = torch.randn(5, 4)
        >>> y, log_det = layer.forward_and_log_det(x)
        >>> torch.equal(y, x), log_det.shape  # identity at initialisation
        (True, torch.Size([5]))
        >>> glow = AffineCoupling((4, 2, 2), mask="channel", hidden=8, scale="sigmoid", clamp=None)
        >>> torch.allclose(glow.inverse(glow(torch.ones(1, 4, 2, 2))), torch.ones(1, 4, 2, 2))
        True
    """

    parameters_per_entry = 2

    def __init__(
        self,
        event_shape: tuple[int, ...],
        mask: MaskName | Tensor = "half",
        *,
        flip: bool = False,
        conditioner: nn.Module | None = None,
        hidden: int = 64,
        scale: Scale = "exp",
        clamp: float | None = 3.0,
        context_features: ContextSpec = 0,
    ) -> None:
        if scale not in ("exp", "sigmoid"):
            raise ValueError(f"AffineCoupling: scale must be 'exp' (RealNVP) or 'sigmoid' (Glow), got {scale!r}")
        if scale == "sigmoid" and clamp is not None:
            raise ValueError(f"AffineCoupling: the sigmoid scale lies in (0, 1) and takes no clamp; got clamp={clamp}")
        if clamp is not None and not (isinstance(clamp, int | float) and math.isfinite(clamp) and clamp > 0):
            raise ValueError(f"AffineCoupling: clamp must be a positive finite number or None, got {clamp!r}")
        super().__init__(
            event_shape, mask, flip=flip, conditioner=conditioner, hidden=hidden, context_features=context_features
        )
        self.scale, self.clamp = scale, clamp

    def _log_scale(self, raw: Tensor) -> Tensor:
        if self.scale == "sigmoid":
            return F.logsigmoid(raw + GLOW_SCALE_OFFSET)
        if self.clamp is None:
            return raw
        return self.clamp * torch.tanh(raw / self.clamp)

    def transform_entries(self, x: Tensor, parameters: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        shift, log_scale = parameters[:, 0], self._log_scale(parameters[:, 1])
        if inverse:
            return (x - shift) * torch.exp(-log_scale), log_scale
        return x * torch.exp(log_scale) + shift, log_scale

    def extra_repr(self) -> str:
        clamp = f", clamp={self.clamp}" if self.scale == "exp" else ""
        return f"{super().extra_repr()}, scale={self.scale!r}{clamp}"
