"""gpderiv: Gaussian-process regression with derivative observations.

The public names are imported on first use (PEP 562), so ``import gpderiv`` and
``gpderiv --version`` do not import torch; ``from gpderiv import DerivativeGP`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "CholeskyError": "gpderiv.exceptions",
    "DerivativeGP": "gpderiv.model",
    "InputWarning": "gpderiv.exceptions",
    "JitterWarning": "gpderiv.exceptions",
    "NotFittedWarning": "gpderiv.exceptions",
    "OptimizationWarning": "gpderiv.exceptions",
    "Prediction": "gpderiv.prediction",
    "ProblemTooLargeError": "gpderiv.exceptions",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access, then keep it in the package."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gpderiv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
