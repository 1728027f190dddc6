"""Inference engines: solves, log-determinants and MLL gradients behind one interface.

An engine gives ``negative_log_marginal`` (differentiable) and ``factor`` (cached for prediction);
a factor gives ``mean``, ``variance_reduction`` and ``covariance_reduction`` of cross-covariances.
"""

from gpderiv.inference.dense import DenseCholesky, DenseFactor, cholesky_with_jitter
from gpderiv.inference.iterative import IterativeCG, IterativeFactor, RBFDerivativeLinearOperator

__all__ = [
    "DenseCholesky",
    "DenseFactor",
    "IterativeCG",
    "IterativeFactor",
    "RBFDerivativeLinearOperator",
    "cholesky_with_jitter",
]
