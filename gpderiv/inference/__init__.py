"""Inference engines: solves, log-determinants and MLL gradients behind one interface.

An engine gives ``negative_log_marginal`` (differentiable) and ``factor`` (cached for prediction);
a factor gives ``mean``, ``variance_reduction`` and ``covariance_reduction`` of cross-covariances.
Engines: :class:`DenseCholesky` (any kernel and observations), :class:`IterativeCG` (matrix-free,
many points) and :class:`StructuredWoodbury` (few points in many dimensions, time linear in d).
"""

from gpderiv.inference.dense import DenseCholesky, DenseFactor, cholesky_with_jitter
from gpderiv.inference.iterative import IterativeCG, IterativeFactor, RBFDerivativeLinearOperator
from gpderiv.inference.structured import IsotropicRBFCovariance, StructuredFactor, StructuredWoodbury

__all__ = [
    "DenseCholesky",
    "DenseFactor",
    "IsotropicRBFCovariance",
    "IterativeCG",
    "IterativeFactor",
    "RBFDerivativeLinearOperator",
    "StructuredFactor",
    "StructuredWoodbury",
    "cholesky_with_jitter",
]
