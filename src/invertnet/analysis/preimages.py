r"""Preimages of ReLU layers (thesis 3.3, Definition 3.1, Theorem 3.3), decided by linear programs.

For y = ReLU(A x + b), the preimage of y is the polyhedron

.. math:: P = \{x : A_E x + b_E = y_E,\; A_Z x + b_Z \le 0\}, \qquad E = \{i : y_i > 0\}, Z = \{i : y_i = 0\}

(Eq. 3.1-3.2). With O an orthonormal basis of the null space of A_E (k = its dimension) and x_0 in P,
P = {x_0 + O t : A_Z O t <= -(A_Z x_0 + b_Z)}. Theorem 3.3: P is a single point if k = 0; for k > 0 it is
bounded exactly when the reduced matrix A_Z O is *omnidirectional* (every open halfspace of R^k contains one
of its rows), and a single point exactly when it also has no extent in any direction. Each question is a
linear program, solved by scipy's HiGHS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["PreimageResult", "is_omnidirectional", "relu_mlp_preimages", "relu_preimage"]

PreimageKind = Literal["point", "polytope", "unbounded", "empty"]


@dataclass
class PreimageResult:
    """The preimage of y under x -> ReLU(A x + b).

    Attributes:
        kind: ``"point"`` (a singleton), ``"polytope"`` (bounded, more than one point), ``"unbounded"`` (a
            recession direction exists) or ``"empty"`` (y is not an output of the layer).
        null_dimension: k = dim N(A_E), with E the rows where y > 0.
        point: A point of the preimage (the unique one for ``"point"``), shape (n,), or ``None`` if empty.
        direction: For ``"unbounded"``: a unit direction d with point + s d in the preimage for all s >= 0.
        extent: For bounded preimages, the largest width of the preimage along the null-space basis.
    """

    kind: PreimageKind
    null_dimension: int
    point: Tensor | None
    direction: Tensor | None = None
    extent: float = 0.0


def _feasible(
    objective: np.ndarray,
    a_ub: np.ndarray | None,
    b_ub: np.ndarray | None,
    a_eq: np.ndarray | None,
    b_eq: np.ndarray | None,
) -> tuple[bool, np.ndarray | None, float]:
    from scipy.optimize import linprog  # imported here: scipy.optimize takes half a second to import

    result = linprog(objective, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=(None, None), method="highs")
    if result.status == 2:  # infeasible
        return False, None, np.inf
    if result.status == 3:  # unbounded objective
        return True, None, -np.inf
    if result.status != 0:
        raise RuntimeError(f"relu_preimage: the linear program failed ({result.message})")
    return True, result.x, float(result.fun)


def _recession_direction(reduced: np.ndarray) -> np.ndarray | None:
    """A nonzero d with reduced @ d <= 0 (the matrix is not omnidirectional), or ``None``: 2k LPs fixing one
    coordinate of d to +-1 (any nonzero d can be scaled to that)."""
    k = reduced.shape[1]
    if reduced.shape[0] == 0:
        return np.eye(k)[0] if k else None
    for j in range(k):
        for sign in (1.0, -1.0):
            a_eq = np.eye(k)[j : j + 1]
            found, d, _ = _feasible(np.zeros(k), reduced, np.zeros(len(reduced)), a_eq, np.array([sign]))
            if found and d is not None:
                return d
    return None


def is_omnidirectional(A: Tensor | np.ndarray) -> bool:
    """Definition 3.1 i): every open linear halfspace of R^n contains a row of A (decided by 2n LPs).

    Examples:
        >>> is_omnidirectional(torch.tensor([[1.0, 0.0], [-0.5, 0.866], [-0.5, -0.866]]))
        True
        >>> is_omnidirectional(torch.eye(2))
        False
    """
    matrix = np.asarray(A.detach().cpu().double() if isinstance(A, Tensor) else A, dtype=np.float64)
    return _recession_direction(matrix) is None


def relu_preimage(A: Tensor, b: Tensor, y: Tensor, *, tol: float = 1e-9) -> PreimageResult:
    r"""Classify the preimage of y under x -> ReLU(A x + b) (thesis Theorem 3.3) and return a witness.

    Arguments:
        A: Weight matrix (m, n).
        b: Bias (m,).
        y: The output (m,), non-negative; entries <= ``tol`` count as zero.
        tol: Zero threshold for y, the rank of A_E and the extent of a single point.

    Examples:
        >>> A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> relu_preimage(A, torch.zeros(2), torch.tensor([0.0, 2.0])).kind  # x_1 <= 0 is free
        'unbounded'
    """
    a, bias, out = (np.asarray(t.detach().cpu().double(), dtype=np.float64) for t in (A, b, y))
    if a.ndim != 2 or bias.shape != (a.shape[0],) or out.shape != (a.shape[0],):
        raise ValueError(f"relu_preimage: need A (m, n), b (m,), y (m,); got {a.shape}, {bias.shape}, {out.shape}")
    if (out < -tol).any():
        raise ValueError("relu_preimage: y has negative entries, so it is not the output of a ReLU")
    positive = out > tol
    a_eq, b_eq = a[positive], out[positive] - bias[positive]
    a_ub, b_ub = a[~positive], -bias[~positive]
    n = a.shape[1]
    # a point of the preimage, as deep inside the inequalities as possible (slack s <= 1 keeps the LP bounded)
    objective = np.zeros(n + 1)
    objective[-1] = -1.0
    slack_ub = np.hstack([a_ub, np.ones((len(a_ub), 1))]) if len(a_ub) else None
    slack_eq = np.hstack([a_eq, np.zeros((len(a_eq), 1))]) if len(a_eq) else None
    limit = np.zeros((1, n + 1))
    limit[0, -1] = 1.0
    found, solution, _ = _feasible(
        objective,
        np.vstack([slack_ub, limit]) if slack_ub is not None else limit,
        np.concatenate([b_ub, [1.0]]),
        slack_eq,
        b_eq if len(a_eq) else None,
    )
    if not found or solution is None or solution[-1] < -tol:
        return PreimageResult("empty", -1, None)
    x0 = solution[:n]
    _, singular, vt = np.linalg.svd(a_eq, full_matrices=True) if len(a_eq) else (None, np.zeros(0), np.eye(n))
    rank = int((singular > tol * max(1.0, singular.max(initial=0.0))).sum())
    basis = vt[rank:].T  # (n, k)
    k = basis.shape[1]
    point = torch.from_numpy(x0)
    if k == 0:
        return PreimageResult("point", 0, point)
    reduced = a_ub @ basis
    direction = _recession_direction(reduced)
    if direction is not None:
        in_x = basis @ direction
        return PreimageResult("unbounded", k, point, torch.from_numpy(in_x / np.linalg.norm(in_x)))
    slack = b_ub - a_ub @ x0
    extent = 0.0
    for j in range(k):
        low = _feasible(np.eye(k)[j], reduced, slack, None, None)[2]
        high = -_feasible(-np.eye(k)[j], reduced, slack, None, None)[2]
        extent = max(extent, high - low)
    return PreimageResult("point" if extent <= tol else "polytope", k, point, extent=extent)


def relu_mlp_preimages(layers: Sequence[nn.Linear], x: Tensor, *, tol: float = 1e-9) -> list[PreimageResult]:
    """Layer by layer through the ReLU MLP h_l = ReLU(A_l h_{l-1} + b_l), h_0 = x: the preimage of each h_l
    under its own layer (thesis 3.3; a layer is only injective on the image of the previous one, so a
    ``"point"`` at every layer means x is determined by the output).

    Arguments:
        layers: The linear layers, each followed by ReLU.
        x: One input, shape (n_0,).
    """
    results = []
    h = x.detach().double()
    for layer in layers:
        weight = layer.weight.detach().double()
        bias = layer.bias.detach().double() if layer.bias is not None else weight.new_zeros(weight.shape[0])
        h = torch.relu(weight @ h + bias)
        results.append(relu_preimage(weight, bias, h, tol=tol))
    return results
