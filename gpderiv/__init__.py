"""gpderiv: Gaussian-process regression with derivative observations."""

from gpderiv.exceptions import (
    CholeskyError,
    InputWarning,
    JitterWarning,
    NotFittedWarning,
    OptimizationWarning,
    ProblemTooLargeError,
)
from gpderiv.model import DerivativeGP
from gpderiv.prediction import Prediction

__version__ = "0.1.0"

__all__ = [
    "CholeskyError",
    "DerivativeGP",
    "InputWarning",
    "JitterWarning",
    "NotFittedWarning",
    "OptimizationWarning",
    "Prediction",
    "ProblemTooLargeError",
    "__version__",
]
