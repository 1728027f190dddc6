"""Inference engines: solves, log-determinants and MLL gradients behind one interface."""

from gpderiv.inference.dense import DenseCholesky, DenseFactor, cholesky_with_jitter

__all__ = ["DenseCholesky", "DenseFactor", "cholesky_with_jitter"]
