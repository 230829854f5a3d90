r"""Recover latent codes from partial measurements y = A G(z) by first-order descent (Ma, Ayaz & Karaman 2018, Eq. 3).

.. math:: \hat z = \arg\min_z J(z), \qquad J(z) = \tfrac12 \| A (G(z) - y) \|^2

Many problems (and random restarts of each) are solved as one batch: each latent has its own optimiser state
and stops when its relative residual |A (G(z) - y)| / |A y| reaches ``rtol`` or when it stalls; only the
latents still running are evaluated, so a batch costs what its running problems cost. Gradient descent adapts one step
size per latent (accepted steps grow it 1.2x; a step that increases J is undone and the step halved), so no
learning rate needs tuning; Adam uses the learning rate 0.1 of Ma, Ayaz & Karaman 2018 by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from invertnet.recovery.masks import Mask

__all__ = ["RecoveryResult", "recover"]

Generator = Callable[..., Tensor]

#: Relative decrease of a latent's best J that counts as progress for the stall test.
STALL_IMPROVEMENT = 1e-3


@dataclass
class RecoveryResult:
    """Record of a batched latent recovery.

    Attributes:
        z: Best latent code per problem (lowest J over restarts), shape (B, *latent_shape).
        completed: G(z), the completed images, shape (B, *image_shape).
        loss: J(z) per problem, shape (B,).
        relative_residual: |A (G(z) - y)| / |A y| per problem, shape (B,).
        converged: relative_residual <= rtol, shape (B,).
        iterations: Generator evaluations performed (one per iteration, for the whole batch).
        loss_history: J of every restart at every iteration, shape (iterations, restarts, B).
        relative_error: |z - z*| / |z*| when the truth z* was given, else ``None``.
        non_unique: True where a second latent code, differing from the returned one by more than the
            uniqueness tolerance, also reproduces the measurements (another converged restart, or the given
            truth): the measurements do not determine z (Ma, Ayaz & Karaman 2018, Fig. 4d), shape (B,).
    """

    z: Tensor
    completed: Tensor
    loss: Tensor
    relative_residual: Tensor
    converged: Tensor
    iterations: int
    loss_history: Tensor
    relative_error: Tensor | None
    non_unique: Tensor

    def summary(self) -> str:
        """One line: convergence, residuals, latent errors and uniqueness."""
        parts = [
            f"{int(self.converged.sum())}/{self.converged.numel()} problems converged in {self.iterations} iterations",
            f"max relative residual {self.relative_residual.max().item():.2e}",
        ]
        if self.relative_error is not None:
            parts.append(f"max relative latent error {self.relative_error.max().item():.2e}")
        if bool(self.non_unique.any()):
            parts.append(f"recovery NOT unique for {int(self.non_unique.sum())} problems")
        return ", ".join(parts)


def _relative_distance(a: Tensor, b: Tensor) -> Tensor:
    """|a - b| / max(|a|, |b|) per row of flattened tensors."""
    scale = torch.maximum(a.flatten(1).norm(dim=1), b.flatten(1).norm(dim=1)).clamp_min(1e-30)
    return (a - b).flatten(1).norm(dim=1) / scale


class _Adam:
    """Adam (betas 0.9, 0.999) on every latent, moving only the active ones."""

    def __init__(self, z: Tensor, lr: float) -> None:
        self.lr, self.m, self.v, self.t = lr, torch.zeros_like(z), torch.zeros_like(z), 0

    def step(self, z: Tensor, loss: Tensor, gradient: Tensor, active: Tensor) -> Tensor:
        self.t += 1
        self.m.lerp_(gradient, 0.1)
        self.v.lerp_(gradient.square(), 0.001)
        update = self.lr * (self.m / (1 - 0.9**self.t)) / ((self.v / (1 - 0.999**self.t)).sqrt() + 1e-12)
        return torch.where(active, z - update, z)


class _AdaptiveDescent:
    """Gradient descent with one step size per latent: grow on a decrease of J, undo and halve on an increase."""

    def __init__(self, z: Tensor, lr: float) -> None:
        shape = (z.shape[0],) + (1,) * (z.dim() - 1)
        self.eta = torch.full(shape, lr, dtype=z.dtype, device=z.device)
        self.accepted_z, self.accepted_loss = z.clone(), torch.full((z.shape[0],), math.inf, dtype=z.dtype)
        self.accepted_gradient = torch.zeros_like(z)

    def step(self, z: Tensor, loss: Tensor, gradient: Tensor, active: Tensor) -> Tensor:
        better = (loss <= self.accepted_loss.to(loss.device)).view_as(self.eta)
        self.accepted_z = torch.where(better, z, self.accepted_z)
        self.accepted_gradient = torch.where(better, gradient, self.accepted_gradient)
        self.accepted_loss = torch.where(better.flatten(), loss, self.accepted_loss.to(loss.device))
        self.eta = torch.where(better, 1.2 * self.eta, 0.5 * self.eta)
        proposal = self.accepted_z - self.eta * self.accepted_gradient
        return torch.where(active, proposal, z)


def recover(
    generator: Generator,
    y: Tensor,
    mask: Mask,
    *,
    latent_shape: tuple[int, ...] | None = None,
    z_true: Tensor | None = None,
    condition: Tensor | None = None,
    method: Literal["adam", "gd"] = "adam",
    lr: float | None = None,
    max_iter: int = 3000,
    rtol: float = 1e-7,
    restarts: int = 1,
    init_std: float = 1.0,
    uniqueness_tol: float = 1e-3,
    patience: int = 300,
    seed: int | None = None,
    progress: bool = False,
    z0: Tensor | None = None,
) -> RecoveryResult:
    r"""Recover z from y = A G(z) for a batch of problems (Ma, Ayaz & Karaman 2018, Eq. 3; Theorems 1 and 4).

    Arguments:
        generator: G, mapping latents (N, *latent_shape) to images (N, C, H, W); called as
            ``generator(z, condition)`` when ``condition`` is given (e.g. the labels of a conditional GAN).
            Put modules with batch norm in eval mode.
        y: Images (B, C, H, W) whose observed pixels are the measurements; unobserved values are ignored.
        mask: The sampling operator A (:class:`~invertnet.recovery.Mask`), shared or one per problem.
        latent_shape: Shape of one latent (default: ``generator.latent_shape``).
        z_true: The true codes (B, *latent_shape), to report ``relative_error`` and detect non-uniqueness.
        condition: Per-problem conditioning (B, ...) passed to the generator.
        method: ``"adam"`` (lr 0.1, the setting of Ma, Ayaz & Karaman 2018) or ``"gd"`` (adaptive step, starting
            at ``lr`` or 0.1).
        max_iter: Iteration budget.
        rtol: Stop a latent when |A (G(z) - y)| <= rtol |A y|.
        restarts: Random initialisations per problem, z_0 ~ N(0, init_std^2); the best is returned, and
            distinct converged restarts reveal non-uniqueness.
        uniqueness_tol: Relative distance above which two codes count as distinct.
        patience: A latent whose best J has not improved by 0.1% for this many iterations is stalled: it stops
            (not converged) so that the batch is not held up, e.g. by codes stuck where every ReLU is off.
        seed: Seed of the initialisations (``None``: torch's global random number generator). Do not reuse
            the seed that drew the true codes: the initialisation would start at the answer.
        progress: Show a progress bar.
        z0: Starting codes (B, *latent_shape) instead of random ones (every restart starts there).

    Examples:
        >>> from invertnet.models import TransposedConvGenerator
        >>> from invertnet.recovery import make_mask
        >>> G = TransposedConvGenerator((4, 1, 1), (16, 1), kernel_size=4).double()
        >>> z = torch.randn(2, 4, 1, 1, dtype=torch.float64)
        >>> result = recover(G, G(z), make_mask("uniform", (16, 16), 0.5), z_true=z, restarts=2)
        >>> bool(result.converged.all()), bool(result.relative_error.max() < 1e-4)
        (True, True)
    """
    latent_shape = _check_arguments(generator, y, latent_shape, method, restarts, max_iter, z_true)
    y = y.detach()
    problems = _Problems.stack(generator, y, mask, condition, restarts)
    if z0 is not None and tuple(z0.shape) != (y.shape[0], *latent_shape):
        raise ValueError(f"recover: z0 must have shape {(y.shape[0], *latent_shape)}, got {tuple(z0.shape)}")
    z = (
        _initial_codes((restarts * y.shape[0], *latent_shape), init_std, seed, y)
        if z0 is None
        else z0.detach().to(dtype=y.dtype, device=y.device).repeat(restarts, *[1] * len(latent_shape))
    )
    optimiser = (_Adam if method == "adam" else _AdaptiveDescent)(z, 0.1 if lr is None else lr)
    state = _descend(problems, z, optimiser, rtol, patience, max_iter, progress)
    _restore_best_accepted(state, optimiser, problems.scale)
    return _result(state, generator, condition, restarts, rtol, uniqueness_tol, z_true)


def _check_arguments(
    generator: Generator,
    y: Tensor,
    latent_shape: tuple[int, ...] | None,
    method: str,
    restarts: int,
    max_iter: int,
    z_true: Tensor | None,
) -> tuple[int, ...]:
    """The latent shape (given, else ``generator.latent_shape``), after refusing images y that are not finite
    (B, C, H, W), an unknown method, non-positive budgets and true codes not of shape (B, *latent_shape)."""
    latent_shape = tuple(latent_shape or getattr(generator, "latent_shape", ()))
    if not latent_shape:
        raise ValueError("recover: pass latent_shape for a generator without a latent_shape attribute")
    if y.dim() != 4:
        raise ValueError(f"recover: y must be images of shape (B, C, H, W), got {tuple(y.shape)}")
    if method not in ("adam", "gd"):
        raise ValueError(f"recover: method must be 'adam' or 'gd', got {method!r}")
    if restarts < 1 or max_iter < 1:
        raise ValueError(f"recover: restarts and max_iter must be positive, got {restarts}, {max_iter}")
    if not torch.isfinite(y).all():
        raise ValueError("recover: the measurements y contain NaN or infinite values")
    expected = (y.shape[0], *latent_shape)
    if z_true is not None and tuple(z_true.shape) != expected:
        raise ValueError(f"recover: z_true must have shape {expected}, got {tuple(z_true.shape)}")
    return latent_shape


@dataclass
class _Problems:
    """B problems x R restarts as one batch of N = R B latents (restart-major): the generator G, the stacked
    sampling operator A, the measurements A y (N, C, H, W), their norms |A y| (N,) and the conditioning
    (N, ...) or ``None``."""

    generator: Generator
    mask: Mask
    target: Tensor
    scale: Tensor
    condition: Tensor | None

    @classmethod
    def stack(cls, generator: Generator, y: Tensor, mask: Mask, condition: Tensor | None, restarts: int) -> _Problems:
        """Repeat the problems y (B, C, H, W), their mask and conditioning (B, ...) ``restarts`` times."""
        stacked = mask.repeat(restarts)
        target = stacked(y.repeat(restarts, 1, 1, 1))
        scale = target.flatten(1).norm(dim=1).clamp_min(1e-30)
        repeated = None if condition is None else condition.repeat(restarts, *[1] * (condition.dim() - 1))
        return cls(generator=generator, mask=stacked, target=target, scale=scale, condition=repeated)

    def evaluate(self, z: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """J, its gradient and the relative residual of the latents z[index] (only those are computed), with
        shapes (n,), (n, *latent_shape) and (n,) for n indices."""
        codes = z[index].detach().requires_grad_(True)
        image = self.generator(codes) if self.condition is None else self.generator(codes, self.condition[index])
        residual = self.mask.select(index)(image) - self.target[index]
        loss = 0.5 * residual.flatten(1).square().sum(dim=1)
        (gradient,) = torch.autograd.grad(loss.sum(), codes)
        return loss.detach(), gradient, residual.detach().flatten(1).norm(dim=1) / self.scale[index]


def _initial_codes(shape: tuple[int, ...], init_std: float, seed: int | None, y: Tensor) -> Tensor:
    """z_0 ~ N(0, init_std^2) of ``shape`` (N, *latent_shape), drawn on the CPU from ``seed`` (``None``: torch's
    global generator), in the dtype and on the device of y."""
    rng = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
    return (init_std * torch.randn(shape, generator=rng, dtype=y.dtype)).to(y.device)


def _per_latent(values: Tensor, z: Tensor) -> Tensor:
    """Per-latent values (N,) viewed to broadcast against latents z (N, *latent_shape)."""
    return values.view((-1,) + (1,) * (z.dim() - 1))


@dataclass
class _DescentState:
    """The batched descent after ``iteration`` evaluations: latents z and gradients (N, *latent_shape); J,
    relative residuals, best J, the iteration of its last 0.1% improvement (on the CPU) and the running flags
    (N,); ``history`` holds J of every latent after each evaluation."""

    z: Tensor
    loss: Tensor
    relative: Tensor
    gradient: Tensor
    best_loss: Tensor
    last_improvement: Tensor
    active: Tensor
    history: list[Tensor] = field(default_factory=list)
    iteration: int = 0

    @classmethod
    def start(cls, z: Tensor) -> _DescentState:
        """Every latent of z (N, *latent_shape) running, nothing evaluated yet (J = inf)."""
        total = z.shape[0]
        loss = torch.full((total,), math.inf, dtype=z.dtype, device=z.device)
        return cls(
            z=z,
            loss=loss,
            relative=torch.full_like(loss, math.inf),
            gradient=torch.zeros_like(z),
            best_loss=torch.full_like(loss, math.inf),
            last_improvement=torch.zeros(total, dtype=torch.long),
            active=torch.ones(total, dtype=torch.bool, device=z.device),
        )

    def evaluate(self, problems: _Problems) -> None:
        """J, gradient and relative residual of the running latents (the others keep theirs); records J (N,).

        Raises:
            FloatingPointError: When J of a running latent is not finite.
        """
        index = self.active.nonzero().squeeze(1)
        self.loss[index], self.gradient[index], self.relative[index] = problems.evaluate(self.z, index)
        self.history.append(self.loss.clone())
        if not torch.isfinite(self.loss[index]).all():
            raise FloatingPointError(f"recover: J became non-finite at iteration {self.iteration}; lower lr")

    def update_running(self, rtol: float, patience: int) -> bool:
        """Stop latents that converged (relative residual <= rtol) or stalled (best J not improved by
        :data:`STALL_IMPROVEMENT` for ``patience`` iterations); True while any latent runs."""
        improved = self.loss < (1 - STALL_IMPROVEMENT) * self.best_loss
        self.best_loss = torch.minimum(self.best_loss, self.loss)
        self.last_improvement[improved.cpu()] = self.iteration
        stalled = (self.iteration - self.last_improvement >= patience).to(self.z.device)
        self.active = (self.relative > rtol) & ~stalled
        return bool(self.active.any())


def _descend(
    problems: _Problems,
    z: Tensor,
    optimiser: _Adam | _AdaptiveDescent,
    rtol: float,
    patience: int,
    max_iter: int,
    progress: bool,
) -> _DescentState:
    """Descend on J from the latents z (N, *latent_shape), one optimiser step per iteration for the running
    latents, until none runs or ``max_iter`` evaluations are spent."""
    state = _DescentState.start(z)
    with tqdm(total=max_iter, disable=not progress, desc="recover", unit="it") as bar:
        for iteration in range(1, max_iter + 1):
            state.iteration = iteration
            state.evaluate(problems)
            running = state.update_running(rtol, patience)
            bar.update(1)
            if not running or iteration == max_iter:
                break
            active = _per_latent(state.active, state.z)
            state.z = optimiser.step(state.z, state.loss, state.gradient, active).detach()
    return state


def _restore_best_accepted(state: _DescentState, optimiser: _Adam | _AdaptiveDescent, scale: Tensor) -> None:
    """For adaptive descent, put back each latent's best accepted code where the last step was rejected, with
    its J and relative residual sqrt(2 J) / |A y| (``scale``, (N,)); Adam's last iterate stands."""
    if not isinstance(optimiser, _AdaptiveDescent):
        return
    better = optimiser.accepted_loss.to(state.loss.device) < state.loss
    state.z = torch.where(_per_latent(better, state.z), optimiser.accepted_z, state.z)
    state.loss = torch.where(better, optimiser.accepted_loss.to(state.loss.device), state.loss)
    state.relative = torch.where(better, (2 * state.loss).sqrt() / scale, state.relative)


def _other_converged_codes(
    codes: Tensor, relative: Tensor, z_best: Tensor, converged: Tensor, rtol: float, uniqueness_tol: float
) -> Tensor:
    """Per problem (B,): whether the best code converged and another converged restart lies at relative
    distance > ``uniqueness_tol`` from it; ``codes`` (R, B, *latent_shape), ``relative`` (R, B)."""
    non_unique = torch.zeros(z_best.shape[0], dtype=torch.bool, device=z_best.device)
    for restart in range(codes.shape[0]):
        far = _relative_distance(codes[restart], z_best) > uniqueness_tol
        non_unique |= converged & (relative[restart] <= rtol) & far
    return non_unique


def _result(
    state: _DescentState,
    generator: Generator,
    condition: Tensor | None,
    restarts: int,
    rtol: float,
    uniqueness_tol: float,
    z_true: Tensor | None,
) -> RecoveryResult:
    """The record: per problem the restart of lowest J, its convergence, non-uniqueness (another converged
    restart or the truth far from it), the error against ``z_true`` (B, *latent_shape) and G(z)."""
    batch = state.z.shape[0] // restarts
    loss, relative = state.loss.view(restarts, batch), state.relative.view(restarts, batch)
    codes = state.z.view(restarts, batch, *state.z.shape[1:])
    best, columns = loss.argmin(dim=0), torch.arange(batch, device=state.z.device)
    z_best = codes[best, columns]
    converged = relative[best, columns] <= rtol
    non_unique = _other_converged_codes(codes, relative, z_best, converged, rtol, uniqueness_tol)
    relative_error = None
    if z_true is not None:
        relative_error = (z_best - z_true).flatten(1).norm(dim=1) / z_true.flatten(1).norm(dim=1).clamp_min(1e-30)
        non_unique |= converged & (_relative_distance(z_best, z_true) > uniqueness_tol)
    with torch.no_grad():
        completed = generator(z_best) if condition is None else generator(z_best, condition)
    return RecoveryResult(
        z=z_best,
        completed=completed,
        loss=loss[best, columns],
        relative_residual=relative[best, columns],
        converged=converged,
        iterations=state.iteration,
        loss_history=torch.stack(state.history).view(len(state.history), restarts, batch).cpu(),
        relative_error=relative_error,
        non_unique=non_unique,
    )
