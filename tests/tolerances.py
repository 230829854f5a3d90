"""Named tolerances for numerical comparisons, per dtype. Never infinite, never loose for show."""

import torch

#: Agreement of two float64 computations of the same quantity by different algorithms.
FLOAT64_ATOL = 1e-8
FLOAT64_RTOL = 1e-7
#: Reconstruction error of an iterative inverse run with default float64 tolerances.
FLOAT64_INVERSE_ATOL = 1e-8


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, atol: float = FLOAT64_ATOL, rtol: float = FLOAT64_RTOL
) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
