"""Input checks in one place: typed errors worded ``<argument>: expected ..., got ...``."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gpderiv.exceptions import InputWarning

__all__ = [
    "as_chunk_size",
    "as_column",
    "as_directional",
    "as_flag",
    "as_float_tensor",
    "as_hessian",
    "as_integer",
    "as_positive_number",
    "as_seed",
    "check_finite",
    "check_hyperparameters",
    "known_noise",
    "subset_points",
]

#: The seeds ``torch.Generator.manual_seed`` accepts: ``[-2**63, 2**64)``.
SEED_RANGE = (-(2**63), 2**64)
SEED_EXPECTED = "an integer in [-2**63, 2**64) (what torch.Generator.manual_seed accepts)"


def _describe(value: Any) -> str:
    """``<type> <repr>`` of a received value, for ``expected ..., got ...`` messages."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _is_integer(value: Any) -> bool:
    """A Python or numpy integer, not a bool (``True`` is an ``int`` in Python but never a count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def as_integer(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None, expected: str | None = None
) -> int:
    """Check an integer argument (a Python or numpy integer, not a bool) and its range ``[minimum, maximum)``.

    Args:
        name: argument name used in error messages.
        value: the input.
        minimum: smallest allowed value.
        maximum: one past the largest allowed value.
        expected: what the message says was expected (default: from the range).

    Raises:
        TypeError: ``value`` is not an integer (a bool, a float such as 2.0, a string).
        ValueError: ``value`` is outside the range.
    """
    if expected is not None:
        pass
    elif minimum is not None and maximum is not None:
        expected = f"an integer in [{minimum}, {maximum})"
    elif minimum == 1:
        expected = "a positive integer"
    elif minimum == 0:
        expected = "a non-negative integer"
    elif minimum is not None:
        expected = f"an integer >= {minimum}"
    else:
        expected = "an integer"
    if not _is_integer(value):
        raise TypeError(f"{name}: expected {expected}, got {_describe(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value >= maximum):
        raise ValueError(f"{name}: expected {expected}, got {value}")
    return value


def as_seed(value: Any) -> int | None:
    """Check a random seed: None or an integer that ``torch.Generator.manual_seed`` accepts."""
    if value is None:
        return None
    return as_integer("seed", value, minimum=SEED_RANGE[0], maximum=SEED_RANGE[1], expected=SEED_EXPECTED)


def as_chunk_size(value: Any) -> int | None:
    """Check ``chunk_size``: None (the default size) or a positive number of test points."""
    return None if value is None else as_integer("chunk_size", value, minimum=1)


def as_flag(name: str, value: Any, *, none_ok: bool = False) -> bool | None:
    """Check a yes/no argument: ``True`` or ``False`` (numpy bools too), never a string or a number.

    A string such as ``"no"`` is truthy and would silently mean yes; a number would silently be
    read as a bool.

    Raises:
        TypeError: ``value`` is not a bool (or None, with ``none_ok``).
    """
    if value is None and none_ok:
        return None
    if not isinstance(value, (bool, np.bool_)):
        expected = "True, False or None" if none_ok else "True or False"
        raise TypeError(f"{name}: expected {expected}, got {_describe(value)}")
    return bool(value)


def as_positive_number(name: str, value: Any) -> float:
    """Check a finite positive real number (not a bool, not a string).

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is not finite and positive.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a positive number, got {_describe(value)}")
    if not 0 < float(value) < math.inf:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def as_float_tensor(
    name: str,
    value: Any,
    *,
    like: Tensor | None = None,
    shape_hint: str,
    warning: type[Warning] = InputWarning,
    stacklevel: int = 3,
) -> Tensor:
    """Convert a tensor, numpy array or (nested) list of numbers to a floating tensor.

    Integer input becomes float64. A float32 or float16 tensor is kept (with an
    :class:`InputWarning` when ``like`` is None) because dtype follows the training inputs.
    When ``like`` is given the result takes its dtype and device: numpy arrays and lists move
    to that device, while a tensor on another device is an error (moving data silently hides
    bugs and costs time).

    Args:
        name: argument name used in error messages.
        value: the input.
        like: reference tensor whose dtype/device the result must follow.
        shape_hint: expected shape for messages, e.g. ``"(n, d)"``.
        warning: the class of the float32 warning (the BoTorch model gives BoTorch's ``InputDataWarning``).
        stacklevel: of that warning: the frame of the user's call (3: the caller of this function's caller).

    Raises:
        TypeError: for unsupported types or non-numeric content.
        ValueError: for a tensor on another device than ``like``.
    """
    if isinstance(value, Tensor):
        tensor = value
    elif isinstance(value, (np.ndarray, list, tuple, int, float, np.number)):
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{name}: expected numbers of shape {shape_hint}, got non-numeric content ({exc})"
            ) from None
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise TypeError(f"{name}: expected real numbers of shape {shape_hint}, got array of dtype {array.dtype}")
        # numpy input is converted to float64 (the recommended precision) without a warning.
        array = array.astype(np.float64, copy=False) if like is None else array
        tensor = torch.tensor(array)  # a copy: the caller's array may be read-only (memmap)
    else:
        raise TypeError(
            f"{name}: expected a torch.Tensor or numpy.ndarray of shape {shape_hint}, got {type(value).__name__}"
        )
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name}: expected real numbers of shape {shape_hint}, got dtype {tensor.dtype}")
    if tensor.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"{name}: expected float64 (or float32), got {tensor.dtype}: Cholesky factorisations need at least "
            "single precision; convert with .double()"
        )
    if like is not None:
        if not isinstance(value, Tensor):  # numpy and lists have no device: they follow the data
            return tensor.to(dtype=like.dtype, device=like.device)
        if tensor.device != like.device:
            raise ValueError(
                f"{name}: expected a tensor on {like.device} (the device of the training data), got {tensor.device}"
            )
        return tensor.to(dtype=like.dtype)
    if not tensor.is_floating_point():
        return tensor.to(torch.float64)
    if tensor.dtype != torch.float64:
        warnings.warn(
            f"{name}: got {tensor.dtype}; derivative GPs are ill-conditioned in low precision, "
            "float64 is recommended (computations follow the dtype of X).",
            warning,
            stacklevel=stacklevel,
        )
    return tensor


def check_finite(name: str, tensor: Tensor) -> None:
    """Raise ``ValueError`` naming the first rows where ``tensor`` is NaN or infinite."""
    bad = ~torch.isfinite(tensor)
    if bad.any():
        rows = torch.nonzero(bad.reshape(tensor.shape[0], -1).any(-1)).flatten()[:5].tolist()
        raise ValueError(f"{name}: expected finite values, got NaN or Inf in rows {rows} (first 5 shown)")


def check_hyperparameters(name: str, module: torch.nn.Module) -> None:
    """Raise ``ValueError`` naming a constrained hyperparameter of ``module`` that is unusable.

    Unusable: NaN or infinite (raw or transformed), outside its constraint's bounds, or zero where
    the constraint asks for positive values (a zero lengthscale, output scale or period; softplus
    reaches it only at a raw value of minus infinity, or by underflow). Such a value makes the
    covariance NaN or singular and would otherwise surface as a failed Cholesky factorisation whose
    advice cannot name it.
    Example: ``kernel.base_kernel.lengthscale: expected positive values, got 0.0``.

    Args:
        name: the argument's name (``"kernel"``, ``"covar_module"``), the prefix of the message.
        module: a GPyTorch module with registered constraints (a kernel).
    """
    for pname, raw, constraint in module.named_parameters_and_constraints():
        if raw.device.type == "meta":  # no values to check
            continue
        with torch.no_grad():
            value = raw if constraint is None else constraint.transform(raw)
            lower = -math.inf if constraint is None else float(constraint.lower_bound.min())
            upper = math.inf if constraint is None else float(constraint.upper_bound.max())
            bad = ~torch.isfinite(raw) | ~torch.isfinite(value) | (value < lower) | (value > upper)
            if lower == 0:  # positive parameters (lengthscales, scales, periods): zero is never usable
                bad |= value == 0
            if not bool(bad.any()):
                continue
        if lower == 0 and upper == math.inf:
            expected = "positive values"
        elif upper == math.inf:
            expected = f"values above {lower:g}"
        else:
            expected = f"values in ({lower:g}, {upper:g})"
        label = ".".join(part.removeprefix("raw_") for part in pname.split("."))
        raise ValueError(f"{name}.{label}: expected {expected}, got {value[bad].reshape(-1)[0].item()!r}")


def subset_points(subset: Any, n: int, device: torch.device) -> int | Tensor | None:
    """Validate ``fit(subset=...)``: None (all points), a number of random points, or point indices."""
    if subset is None:
        return None
    if isinstance(subset, int) and not isinstance(subset, bool):
        if subset < 1:
            raise ValueError(f"subset: expected a positive number of points, got {subset!r}")
        return None if subset >= n else subset
    index = torch.as_tensor(subset.detach().cpu() if isinstance(subset, Tensor) else np.asarray(subset))
    if index.ndim != 1 or index.numel() == 0 or index.is_floating_point() or index.dtype == torch.bool:
        raise ValueError(f"subset: expected a number of points or `k` point indices, got {type(subset).__name__}")
    index = index.unique()
    if index.min() < 0 or index.max() >= n:
        raise ValueError(f"subset: expected point indices in [0, {n}), got [{int(index.min())}, {int(index.max())}]")
    return index.to(device)


def as_column(name: str, value: Any, X: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Convert ``y`` (`n`) or ``grad`` (`n x d`) and check its shape against X."""
    hint = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
    t = as_float_tensor(name, value, like=X, shape_hint=hint)
    if len(shape) == 1 and t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if len(shape) == 2 and shape[1] == 1 and t.ndim == 1:
        t = t.unsqueeze(-1)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {hint} to match X of shape {tuple(X.shape)}, got {tuple(t.shape)}")
    return t


def as_directional(value: Any, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Check ``(index, V, values)`` of directional-derivative observations against X."""
    n, d = X.shape
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise TypeError(f"directional: expected a tuple (index, directions, values), got {type(value).__name__}")
    index, V, values = value
    index = torch.as_tensor(index.detach().cpu() if isinstance(index, Tensor) else np.asarray(index))
    if index.ndim != 1 or index.is_floating_point() or index.dtype == torch.bool:
        raise TypeError(
            f"directional: expected index as `k` integers, got dtype {index.dtype} shape {tuple(index.shape)}"
        )
    k = index.numel()
    if k and (index.min() < 0 or index.max() >= n):
        raise ValueError(
            f"directional: expected point indices in [0, {n}), got values in [{int(index.min())}, {int(index.max())}]"
        )
    V = as_column("directional directions", V, X, (k, d))
    check_finite("directional directions", V)
    if (V.norm(dim=-1) == 0).any():
        raise ValueError("directional directions: expected non-zero direction vectors, got a zero row")
    values = as_column("directional values", values, X, (k,))
    return index.to(X.device), V, values


def as_hessian(value: Any, X: Tensor) -> Tensor:
    """Check `n x d x d` second-derivative observations (`n` accepted for d = 1)."""
    n, d = X.shape
    H = as_float_tensor("hessian", value, like=X, shape_hint=f"({n}, {d}, {d})")
    if d == 1 and H.shape in ((n,), (n, 1)):
        H = H.reshape(n, 1, 1)
    if tuple(H.shape) != (n, d, d):
        raise ValueError(
            f"hessian: expected shape ({n}, {d}, {d}) to match X of shape ({n}, {d}), got {tuple(H.shape)}"
        )
    return H


def known_noise(name: str, value: Any, size: int) -> Tensor:
    """Check a known noise variance (scalar or `size` values); it is a constant, never learned.

    Bools and strings are refused (``noise=True`` is not a variance of 1).

    Raises:
        TypeError: ``value`` is not a number or numbers.
        ValueError: the wrong number of values, or a negative or non-finite variance.
    """
    expected = f"a number or {size} numbers" if size > 1 else "a number"
    raw = value.detach().cpu() if isinstance(value, Tensor) else value
    if isinstance(raw, (str, bytes)) or (
        isinstance(raw, (bool, np.bool_, list, tuple, np.ndarray, Tensor)) and _is_bool_array(raw)
    ):
        raise TypeError(f"{name}: expected {expected} (a variance), got {_describe(value)}")
    try:
        t = torch.as_tensor(value.detach() if isinstance(value, Tensor) else value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}: expected {expected} (a variance), got {type(value).__name__}") from None
    t = t.reshape(-1)
    if t.numel() not in (1, size) or not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name}: expected a non-negative variance (scalar or {size} values), got {value!r}")
    return t


def _is_bool_array(value: Any) -> bool:
    """Whether a bool, list, array or tensor holds bools."""
    if isinstance(value, Tensor):
        return value.dtype == torch.bool
    try:
        return np.asarray(value).dtype == np.bool_
    except (TypeError, ValueError):
        return False
