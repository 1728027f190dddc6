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
    """Import a public name (or a submodule, as ``gpderiv.model``) on first access, then keep it in the package."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    try:  # the eager package made every submodule it imported an attribute; keep that working
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise  # a missing dependency of an existing submodule
        raise AttributeError(f"module 'gpderiv' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
