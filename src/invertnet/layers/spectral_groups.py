r"""Spectral normalisation of many same-shaped linear layers at once.

A dense i-ResNet flow of T blocks holds T linear layers of each shape, and each training call of a
:class:`~invertnet.layers.SpectralNormLinear` runs its power steps and the scaling of thesis Eq. 4.9 as a few
dozen small tensor operations. At the sizes of these flows the operations' fixed cost dominates (on 2 CPU cores
the 18 layers of a 6-block 64-128-128-64 flow spent 37 % of a training step there; on a GPU each is a kernel
launch), so :func:`normalize_together` stacks the weights of every group of layers that share a shape, dtype,
device, coefficient and number of power steps and takes both in batched operations, once per group:

.. math:: u_i, v_i \leftarrow \text{power steps of } W_i, \qquad
    \sigma_i = \|W_i v_i\|_2, \qquad \tilde W_i = W_i / \max(1, r_i \sigma_i / c),

the same numbers, buffers and gradients as the layers' own calls (up to the rounding of batched products).
Each layer then returns its :math:`\tilde W_i` from its next ``normalized_weight`` call, until
:func:`release_together`. :class:`~invertnet.models.FlowDistribution` does this around every training-mode
``log_prob``; other code can call the pair around its own forward pass.

Left to the layers' own calls: layers in eval mode (no power step to batch), other norms than the 2-norm, groups
of one, layers inside a :class:`~invertnet.layers.MemorySavingSequential`, whose backward pass recomputes its
parts' forward passes, and everything under ``torch.compile``, which removes the per-operation cost itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from invertnet.layers.memory_saving import MemorySavingSequential
from invertnet.layers.spectral import SpectralNormLinear, _matvec, linear_power_steps

__all__ = ["normalize_together", "release_together"]


def _candidates(module: nn.Module) -> Iterator[SpectralNormLinear]:
    """Training-mode 2-norm SpectralNormLinear layers of ``module`` not yet normalised, outside memory-saving parts."""
    if isinstance(module, SpectralNormLinear):
        if module.training and (module.domain_order, module.codomain_order) == (2.0, 2.0):
            if module._grouped_weight is None:
                yield module
        return
    if isinstance(module, MemorySavingSequential):
        return
    for child in module.children():
        yield from _candidates(child)


def normalize_together(module: nn.Module) -> list[SpectralNormLinear]:
    """Take the power steps and the normalisation of ``module``'s groups of same-shaped linear layers in batched
    operations; each grouped layer's next calls use the result. Returns the grouped layers, for
    :func:`release_together`.

    A group is the training-mode 2-norm :class:`~invertnet.layers.SpectralNormLinear` layers with the same weight
    shape, dtype, device, ``coeff`` and ``n_power_iterations``; groups of one are left alone. Gradients of the
    normalised weights reach each layer's own weight when gradients are enabled.

    Arguments:
        module: Any module; its submodules are searched.

    Examples:
        >>> from invertnet.layers import LipschitzMLP
        >>> net = nn.Sequential(*(LipschitzMLP(4, 8, n_layers=2) for _ in range(3)))
        >>> grouped = normalize_together(net)
        >>> len(grouped)
        6
        >>> y = net(torch.randn(5, 4))
        >>> release_together(grouped)
    """
    if torch.compiler.is_compiling():  # compiled code has no per-operation overhead to save
        return []
    groups: dict[tuple, list[SpectralNormLinear]] = {}
    for layer in _candidates(module):
        weight = layer.weight
        key = (tuple(weight.shape), weight.dtype, weight.device, layer.coeff, layer.n_power_iterations)
        groups.setdefault(key, []).append(layer)
    grouped: list[SpectralNormLinear] = []
    for layers in groups.values():
        if len(layers) > 1:
            _normalize_group(layers)
            grouped += layers
    return grouped


def release_together(layers: list[SpectralNormLinear]) -> None:
    """Return ``layers`` to their own power steps and normalisation (after the forward pass that used the group)."""
    for layer in layers:
        layer._grouped_weight = None


def _normalize_group(layers: list[SpectralNormLinear]) -> None:
    """Eq. 4.9 for a stack of same-shaped layers: power steps, sigma, the scaled weights; buffers updated."""
    weights = torch.stack([layer.weight for layer in layers])  # (k, out, in)
    steps = layers[0].n_power_iterations
    with torch.no_grad():
        v = torch.stack([layer.v for layer in layers])
        if steps:
            u, v = linear_power_steps(weights.detach(), v, steps)
            # own storage per layer: shared views would not save as safetensors
            for layer, layer_u, layer_v in zip(layers, u.unbind(), v.unbind(), strict=True):
                layer.u, layer.v = layer_u.clone(), layer_v.clone()
        inflation = torch.stack([layer.inflation for layer in layers])
    sigma = torch.linalg.vector_norm(_matvec(weights, v), dim=-1)  # (k,)
    factor = torch.clamp(sigma * inflation / layers[0].coeff, min=1.0)
    normalized = weights / factor[:, None, None]
    for layer, layer_sigma, weight in zip(layers, sigma.detach().unbind(), normalized.unbind(), strict=True):
        layer.sigma = layer_sigma.clone()
        layer._grouped_weight = weight
