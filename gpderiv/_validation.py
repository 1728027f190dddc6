"""Input checks in one place: typed errors worded ``<argument>: expected ..., got ...``."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gpderiv.exceptions import InputWarning

__all__ = ["as_float_tensor", "check_finite"]


def as_float_tensor(
    name: str,
    value: Any,
    *,
    like: Tensor | None = None,
    shape_hint: str,
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
            InputWarning,
            stacklevel=3,
        )
    return tensor


def check_finite(name: str, tensor: Tensor) -> None:
    """Raise ``ValueError`` naming the first rows where ``tensor`` is NaN or infinite."""
    bad = ~torch.isfinite(tensor)
    if bad.any():
        rows = torch.nonzero(bad.reshape(tensor.shape[0], -1).any(-1)).flatten()[:5].tolist()
        raise ValueError(f"{name}: expected finite values, got NaN or Inf in rows {rows} (first 5 shown)")
