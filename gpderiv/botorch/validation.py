"""Input checks of the BoTorch model, in one place (BoTorch's ``_validate_tensor_args`` pattern).

Every tensor argument of :class:`~gpderiv.botorch.DerivativeGPModel` (training data, test points,
observation noise, conditioning data) goes through :func:`validate_tensor_args`, with the message
style of :class:`~gpderiv.DerivativeGP`: ``"<argument>: expected ..., got ..."``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from botorch import settings
from botorch.exceptions import InputDataWarning
from botorch.models.utils.assorted import check_min_max_scaling, check_standardization
from torch import Tensor

from gpderiv._validation import as_float_tensor

__all__ = ["check_indices", "check_scaling", "validate_tensor_args"]


def check_indices(indices: Any, name: str, high: int) -> list[int]:
    """Distinct integer indices in ``[0, high]`` (``outputs``, ``output_indices``, ``idcs``); never truncated.

    Raises:
        TypeError: not a list, tuple, range or 1-D integer tensor of integers (floats and bools are refused).
        ValueError: empty, out of range or repeated.
    """
    meaning = " (0 = f, 1 + a = df/dx_a)" if name != "idcs" else ""
    integral = (int, np.integer)
    if isinstance(indices, Tensor) and indices.dim() == 1 and not (indices.is_floating_point() or indices.is_complex()):
        ok = indices.dtype != torch.bool
        values = indices.tolist()
    else:
        values = list(indices) if isinstance(indices, (list, tuple, range)) else []
        ok = isinstance(indices, (list, tuple, range)) and all(
            isinstance(i, integral) and not isinstance(i, (bool, np.bool_)) for i in values
        )
    if not ok:
        raise TypeError(f"{name}: expected a list of integer indices in [0, {high}]{meaning}, got {indices!r}")
    if not values or any(i < 0 or i > high for i in values):
        raise ValueError(f"{name}: expected indices in [0, {high}]{meaning}, got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: expected distinct indices, got {values}")
    return [int(i) for i in values]


def validate_tensor_args(
    X: Any,
    Y: Any = None,
    Yvar: Any = None,
    *,
    names: tuple[str, str, str] = ("X", "Y", "noise"),
    d: int | None = None,
    like: Tensor | None = None,
    batch_shape: tuple[int, ...] = (),
    num_outputs: int = 1,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Check and convert every tensor argument of :class:`DerivativeGPModel` (the one place that does).

    Errors are worded ``<argument>: expected ..., got ...``, as :class:`~gpderiv.DerivativeGP`'s.
    Three uses:

    * training data (``like`` None): ``train_X`` `batch x n x d` floating point (float16 and
      bfloat16 refused, float32 warned), ``train_Y`` `batch x n x (1 + d)` (or `batch x n x 1`:
      values only, the gradients are then NaN, as BoTorch's single-output models take it) and
      ``train_Yvar`` in ``train_Y``'s shape, both converted to ``train_X``'s dtype. Training data is data: all three
      are returned detached from any autograd graph.
    * test points (``like`` given, ``Y`` None): `batch x q x d` ``X`` (``q = 0`` allowed) converted
      to ``like``'s dtype; ``Yvar`` is ``posterior``'s ``observation_noise``, broadcastable to
      the posterior's `batch x q x num_outputs`. Graphs are kept: acquisition functions
      differentiate with respect to ``X``.
    * new observations (``like`` and ``Y`` given): `batch x n' x d` ``X``, `batch' x n' x (1 + d)`
      (or `batch' x n' x 1`: values only, the gradients are then NaN) ``Y`` and variances
      ``Yvar`` broadcastable to ``Y``. Graphs are kept: fantasies of candidate points carry them.

    NaN in ``Y`` means "not observed" and must miss the same entries in every batch member (they
    share the rows of the linear system); variances must be finite and non-negative wherever ``Y``
    is observed.

    Args:
        X: inputs.
        Y: observations ``[f, df/dx_1, ..., df/dx_d]`` per point, or None (test points).
        Yvar: variances of ``Y`` (of the posterior's outputs for test points), or None.
        names: the three arguments' names in messages.
        d: the model's input dimension (None: taken from ``X``).
        like: a tensor of the model (its dtype and device), None for training data.
        batch_shape: the model's batch shape, with which the new tensors' batch shapes must broadcast.
        num_outputs: the posterior's number of outputs `m` (test points only).

    Returns:
        ``(X, Y, Yvar)`` checked and converted (``Y``, ``Yvar`` None when not given).

    Raises:
        TypeError: not a tensor, an integer training tensor, half precision, a complex or bool tensor.
        ValueError: a shape that does not fit, NaN or Inf in ``X``, Inf in ``Y``, different missing
            entries in the batch members or none observed, a NaN, Inf or negative variance, a
            tensor on another device than the model's.
    """
    xname, yname, vname = names
    training = like is None
    X = _as_tensor(xname, X, like, training)
    d = X.shape[-1] if d is None and X.dim() >= 2 else d
    points = "q" if Y is None and not training else "n"
    if X.dim() < 2 or X.shape[-1] != d or d == 0 or (points == "n" and X.shape[-2] == 0):
        expected = "(batch x) n x d with n >= 1 and d >= 1" if training else f"batch x {points} x {d}"
        raise ValueError(f"{xname}: expected shape {expected}, got {tuple(X.shape)}")
    _check_broadcast(xname, X.shape[:-2], batch_shape, "the model's batch shape")
    _check_finite(xname, X, "values")
    n = X.shape[-2]
    values_only = False
    if Y is not None:
        Y = _as_tensor(yname, Y, X, False)
        if training and (Y.dim() < 2 or Y.shape[-2:] not in ((n, 1), (n, 1 + d)) or Y.shape[:-2] != X.shape[:-2]):
            raise ValueError(
                f"{yname}: expected shape {(*X.shape[:-2], n, 1 + d)} ([f, df/dx_1, ..., df/dx_d] per point) or "
                f"{(*X.shape[:-2], n, 1)} (values only), got {tuple(Y.shape)}"
            )
        if Y.dim() < 2 or Y.shape[-2] != n or Y.shape[-1] not in (1, 1 + d):
            raise ValueError(
                f"{yname}: expected shape batch x {n} x {1 + d} ([f, grad f] at each X), got {tuple(Y.shape)}"
            )
        batch = torch.broadcast_shapes(batch_shape, X.shape[:-2])
        _check_broadcast(yname, Y.shape[:-2], batch, "X's and the model's")
        values_only = Y.shape[-1] == 1
        if values_only:  # the gradients were not observed
            Y = torch.cat([Y, Y.new_full((*Y.shape[:-1], d), float("nan"))], -1)
        if torch.isinf(Y).any():
            raise ValueError(f"{yname}: expected finite observations or NaN (= not observed), got Inf")
        seen = ~torch.isnan(Y).reshape(-1, n, 1 + d)
        if not bool((seen == seen[0]).all()):
            raise ValueError(
                f"{yname}: expected the same missing (NaN) entries in every batch member (they share the rows of "
                "the linear system), got different patterns; fit separate models instead"
            )
        if not bool(seen[0].any()):
            raise ValueError(f"{yname}: expected at least one observed (non-NaN) entry, got none")
    if Yvar is not None:
        Yvar = _as_tensor(vname, Yvar, X, False)
        batch = torch.broadcast_shapes(batch_shape, X.shape[:-2])
        target = Y.shape if Y is not None else torch.Size([*batch, n, num_outputs])
        if training and values_only and Yvar.dim() >= 2 and Yvar.shape[-1] == 1 and Yvar.shape[:-1] == Y.shape[:-1]:
            Yvar = torch.cat([Yvar, Yvar.new_full((*Yvar.shape[:-1], d), float("nan"))], -1)  # values only
        if training and Yvar.shape != Y.shape:
            raise ValueError(f"{vname}: expected shape {tuple(Y.shape)} like {yname}, got {tuple(Yvar.shape)}")
        _check_broadcast(vname, Yvar.shape, target, "", exact=True)
        observed = torch.ones(target, dtype=torch.bool, device=X.device) if Y is None else ~torch.isnan(Y)
        values = Yvar.expand(target)[observed]
        bad = ~torch.isfinite(values) | (values < 0)
        if bool(bad.any()):
            where = "" if Y is None else f" at every observed entry of {yname}"
            raise ValueError(f"{vname}: expected finite non-negative variances{where}, got {values[bad][0].item()}")
        if training:
            Yvar = torch.where(observed, Yvar, torch.full_like(Yvar, float("nan")))
    if training:  # data, not part of anyone's graph: fitting backpropagates through the loss many times
        X, Y, Yvar = (None if t is None else t.detach() for t in (X, Y, Yvar))
    return X, Y, Yvar


def _as_tensor(name: str, value: Any, like: Tensor | None, training: bool) -> Tensor:
    """A floating tensor: training inputs as they are (float32 warned), others in ``like``'s dtype and device."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if training and not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    # BoTorch's warning class for float32 training inputs, as SingleTaskGP's, at the constructor's caller
    # (model -> validate_tensor_args -> _as_tensor -> as_float_tensor).
    return as_float_tensor(
        name, value, like=like, shape_hint="batch x n x d", warning=InputDataWarning, stacklevel=5
    )


def _check_broadcast(name: str, shape: tuple[int, ...], other: tuple[int, ...], what: str, exact: bool = False) -> None:
    """``shape`` broadcasts with ``other`` (``exact``: to ``other`` itself, as ``expand`` needs)."""
    try:
        result = torch.broadcast_shapes(shape, other)
    except RuntimeError:
        result = None
    if exact and result != other:
        raise ValueError(f"{name}: expected a shape that broadcasts to {tuple(other)}, got {tuple(shape)}")
    if result is None:
        raise ValueError(
            f"{name}: expected a batch shape that broadcasts with {what} {tuple(other)}, got {tuple(shape)}"
        )


def _check_finite(name: str, tensor: Tensor, what: str) -> None:
    """``ValueError`` naming the first index of a NaN or Inf in ``tensor``."""
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        first = tuple(torch.nonzero(bad)[0].tolist())
        raise ValueError(f"{name}: expected finite {what}, got NaN or Inf (first at index {first})")


def check_scaling(X_t: Tensor, Y_t: Tensor) -> None:
    """BoTorch's scaling checks, as ``SingleTaskGP`` runs them: ``InputDataWarning`` on unscaled data.

    ``check_min_max_scaling`` on the `batch x n x d` inputs ``X_t`` and ``check_standardization``
    on the observed values (column 0) of the `batch x n x (1 + d)` outcomes ``Y_t``, both after the
    transforms. The gradient columns are left out: they are scaled with the values but never
    centred, so neither zero mean nor unit variance is expected of them. Off under
    ``botorch.settings.validate_input_scaling(False)``.
    """
    if settings.validate_input_scaling.off():
        return
    check_min_max_scaling(X_t)
    seen = ~torch.isnan(Y_t[..., 0].reshape(-1, Y_t.shape[-2])[0])  # the same in every batch member
    if bool(seen.any()):
        check_standardization(Y_t[..., seen, :1])
