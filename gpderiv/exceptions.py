"""Errors and warnings of gpderiv."""

from __future__ import annotations

from linear_operator.utils.errors import NotPSDError

__all__ = [
    "CholeskyError",
    "InputWarning",
    "JitterWarning",
    "NotFittedWarning",
    "OptimizationWarning",
    "ProblemTooLargeError",
]


class CholeskyError(NotPSDError):
    """The covariance could not be factorised, even after jitter was added to its diagonal.

    Subclasses ``linear_operator``'s ``NotPSDError`` so code that catches GPyTorch's error
    (BoTorch's fitting loop, for instance) catches this one too.
    """


class JitterWarning(RuntimeWarning):
    """Jitter had to be added to the diagonal of the covariance to factorise it."""


class InputWarning(UserWarning):
    """The input was accepted but deserves attention (float32 precision, for instance)."""


class NotFittedWarning(UserWarning):
    """A prediction used hyperparameters that were never fitted (the initial values).

    Raised once per model, at its first prediction, unless ``model.fitted`` is True: after
    ``fit()``, for a model loaded from a file saved after ``fit()``, or when set by the user who
    chose the hyperparameters by hand.
    """


class OptimizationWarning(UserWarning):
    """The hyperparameter optimiser stopped before it converged (its iteration limit was reached)."""


class ProblemTooLargeError(MemoryError):
    """An engine, or a prediction, would need more memory than is available; raised before allocating.

    The message says what is too large (the engine and N, or the number of test rows) and what to do.
    """
