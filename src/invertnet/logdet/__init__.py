"""Log-determinant estimators of residual blocks: exact (brute force, or structured for dense branches),
truncated power series, unbiased; and bounds."""

from invertnet.logdet.bounds import log_det_bounds as log_det_bounds
from invertnet.logdet.dense import DenseExactLogDet as DenseExactLogDet
from invertnet.logdet.exact import ExactLogDet as ExactLogDet
from invertnet.logdet.series import PowerSeriesLogDet as PowerSeriesLogDet
from invertnet.logdet.series import UnbiasedLogDet as UnbiasedLogDet
from invertnet.logdet.series import n_terms_for_bias as n_terms_for_bias
from invertnet.logdet.series import truncation_error_bound as truncation_error_bound

__all__ = [
    "DenseExactLogDet",
    "ExactLogDet",
    "PowerSeriesLogDet",
    "UnbiasedLogDet",
    "log_det_bounds",
    "n_terms_for_bias",
    "truncation_error_bound",
]
