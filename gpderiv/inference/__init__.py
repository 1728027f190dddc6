"""Inference engines behind one contract (:class:`Engine`), registered by name.

An engine gives a differentiable ``negative_log_marginal`` and a ``factor`` (cached for
prediction: posterior mean, variance and covariance at test points, ``extend`` for new rows);
see :mod:`gpderiv.inference.base`. Registered engines: ``"dense"`` (:class:`DenseCholesky`, any
kernel and observations), ``"iterative"`` (:class:`IterativeCG`, matrix-free, many points) and
``"structured"`` (:class:`StructuredWoodbury`, few points in many dimensions, time linear in d)
and ``"variational"`` (:class:`VariationalELBO`, approximate: inducing values and directional
derivatives trained on minibatches, for millions of observations).
``"auto"`` chooses among them in :func:`select_engine`. A new engine: subclass :class:`Engine`
and call :func:`register_engine`.
"""

from gpderiv.inference.base import Engine, Factor, FactorCache, available_memory, cgroup_headroom
from gpderiv.inference.dense import DenseCholesky, DenseFactor, cholesky_with_jitter
from gpderiv.inference.iterative import IterativeCG, IterativeFactor, RBFDerivativeLinearOperator
from gpderiv.inference.registry import engine_names, get_engine, register_engine, resolve_engine, select_engine
from gpderiv.inference.structured import IsotropicRBFCovariance, StructuredFactor, StructuredWoodbury
from gpderiv.inference.variational import VariationalELBO, VariationalFactor

register_engine("dense", DenseCholesky)
register_engine("iterative", IterativeCG)
register_engine("structured", StructuredWoodbury)
register_engine("variational", VariationalELBO)

__all__ = [
    "DenseCholesky",
    "DenseFactor",
    "Engine",
    "Factor",
    "FactorCache",
    "IsotropicRBFCovariance",
    "IterativeCG",
    "IterativeFactor",
    "RBFDerivativeLinearOperator",
    "StructuredFactor",
    "StructuredWoodbury",
    "VariationalELBO",
    "VariationalFactor",
    "available_memory",
    "cgroup_headroom",
    "cholesky_with_jitter",
    "engine_names",
    "get_engine",
    "register_engine",
    "resolve_engine",
    "select_engine",
]
