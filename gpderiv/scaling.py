"""Internal scaling: inputs to the unit box, values standardised, gradients scaled consistently."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gpderiv.observations import Functionals, ObservationSet

__all__ = ["Scaling", "scale_limits"]


def scale_limits(dtype: torch.dtype) -> tuple[float, float]:
    """``(lo, hi)``: the row factors (scales) whose squares stay representable in ``dtype``.

    Variances in the user's units are internal variances times a squared factor, so a factor
    must lie within ``sqrt(tiny)`` and ``sqrt(max)`` of the dtype, with a margin of 1e4 for
    internal variances away from 1: ``[1.5e-150, 1.3e150]`` in float64, ``[1.1e-15, 1.8e15]`` in
    float32.
    """
    info = torch.finfo(dtype)
    return math.sqrt(info.tiny) * 1e4, math.sqrt(info.max) / 1e4


class Scaling(torch.nn.Module):
    r"""Affine maps between the user's units and the model's internal units.

    .. math::

        \tilde x = (x - x_{lo}) / s_x, \qquad \tilde y = (y - \mu_y) / \sigma_y, \qquad
        \widetilde{\partial_a f} = \partial_a f \; s_{x,a} / \sigma_y

    with :math:`s_x` the range of each input dimension and :math:`\mu_y, \sigma_y` the mean and
    standard deviation of the observed values. Gradients are scaled and never centred. A
    constant dimension (or a single point) gets :math:`s_x = 1`; with fewer than two distinct
    values :math:`\sigma_y` falls back to the RMS of the scaled gradients, or 1.

    Row factors: an observation of kind ``k`` (0 = value, ``1 + a`` = :math:`\partial_a f`) in user
    units equals ``factor[k] * internal + offset[k]``, with ``factor = [sigma_y,
    sigma_y / s_x]`` and ``offset = [mu_y, 0, ..., 0]``.

    Variances in the user's units are internal ones times squared factors, so every factor must
    have a representable square: :math:`\sigma_y` and each :math:`\sigma_y / s_{x,a}` must lie
    within :func:`scale_limits` (``[1.5e-150, 1.3e150]`` in float64), and data outside are refused.

    Raises:
        ValueError: the range of an input overflows, or a factor is outside :func:`scale_limits`
            (naming ``y``, ``grad`` or ``X``).
    """

    def __init__(self, X: Tensor, obs: ObservationSet) -> None:
        super().__init__()
        lo, hi = X.min(0).values, X.max(0).values
        x_scale = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        if not torch.isfinite(x_scale).all():
            column = int(torch.nonzero(~torch.isfinite(x_scale))[0])
            raise ValueError(
                f"X: the range of column {column} ([{lo[column].item():.3g}, {hi[column].item():.3g}]) overflows "
                f"{X.dtype}; rescale the inputs"
            )
        values = obs.targets[obs.is_value]
        y_offset = _robust_mean(values) if values.numel() else X.new_zeros(())
        y_scale = _robust_std(values) if values.numel() > 1 else X.new_zeros(())
        source = "y: the standard deviation of the observed values"
        if not y_scale > 0:
            partial = (obs.kinds >= 1) & (obs.kinds <= obs.d)
            grads = obs.targets[partial]
            y_scale = _robust_rms(grads, x_scale[obs.kinds[partial] - 1]) if grads.numel() else X.new_ones(())
            y_scale = y_scale if y_scale > 0 else X.new_ones(())
            source = "grad: the RMS of the derivatives times the input ranges (the scale of f without values)"
        _check_scales(source, y_scale, x_scale, lo, hi, X.dtype)
        self.register_buffer("x_offset", lo)
        self.register_buffer("x_scale", x_scale)
        self.register_buffer("y_offset", y_offset.reshape(()))
        self.register_buffer("y_scale", y_scale.reshape(()))

    def x(self, X: Tensor) -> Tensor:
        """Map `... x d` inputs to internal units."""
        return (X - self.x_offset) / self.x_scale

    def factor(self, kinds: Tensor) -> Tensor:
        """Per-row factors (user = factor * internal + offset) for observation ``kinds``."""
        table = torch.cat([self.y_scale.reshape(1), self.y_scale / self.x_scale])
        return table[kinds]

    def offset(self, kinds: Tensor) -> Tensor:
        """Per-row offsets: the value mean for value rows, zero for derivative rows."""
        return torch.where(kinds == 0, self.y_offset, torch.zeros_like(self.y_offset))

    def to_internal(self, values: Tensor, kinds: Tensor) -> Tensor:
        """Map observations of the given kinds from user to internal units."""
        return (values - self.offset(kinds)) / self.factor(kinds)

    def functionals_to_internal(self, F: Functionals) -> tuple[Functionals, Tensor]:
        r"""Map derivative functionals with user-unit coefficients to internal units.

        :math:`\partial^\alpha f_{user} = \sigma_y \prod_{a \in \alpha} s_{x,a}^{-1}\, \partial^\alpha
        f_{internal}`, so a functional with coefficients :math:`c_k` has internal coefficients
        :math:`c'_k = c_k \prod_{a \in \alpha_k} s_{x,a}^{-1}`, normalised to unit length; its
        row factor is :math:`\sigma_y \lVert c' \rVert`. (For a Hessian entry ``(a, b)`` the
        factor is :math:`\sigma_y / (s_a s_b)`, the convention of the partial derivatives.)
        Functionals must not contain value terms (those would need the offset).

        Returns:
            ``(internal functionals, factor)`` with `R` row factors (user = factor * internal).
        """
        inv = torch.cat([(1.0 / self.x_scale), self.x_scale.new_ones(1)])  # index -1 -> 1
        scale = inv[F.idx].prod(-1)  # R x K
        coef = F.coef * scale
        norm = coef.norm(dim=-1)
        return Functionals(F.point, F.idx, coef / norm.unsqueeze(-1)), self.y_scale * norm

    @staticmethod
    def block_kinds(m: int, d: int, device: torch.device) -> Tensor:
        """Kinds of the `m (1 + d)` rows of a block-layout vector at ``m`` points."""
        return torch.cat(
            [torch.zeros(m, dtype=torch.long, device=device), torch.arange(1, d + 1, device=device).repeat(m)]
        )


def _robust_std(values: Tensor) -> Tensor:
    """Standard deviation computed on values divided by their largest magnitude.

    ``values.std()`` overflows to inf beyond a spread of ~1e154 in float64 (the squares do)
    and underflows to 0 below ~1e-160; dividing first keeps every magnitude representable.
    """
    top = values.abs().max()
    return (values / top).std() * top if top > 0 else values.new_zeros(())


def _robust_mean(values: Tensor) -> Tensor:
    """Mean of ``values``; computed on values divided by their largest magnitude if the sum overflows."""
    mean = values.mean()
    if torch.isfinite(mean):
        return mean
    top = values.abs().max()
    return (values / top).mean() * top


def _robust_rms(values: Tensor, weights: Tensor) -> Tensor:
    """RMS of ``values * weights``; if that over- or underflows, in an order that overflows only if the RMS does."""
    rms = (values * weights).square().mean().sqrt()
    top = values.abs().max()
    if torch.isfinite(rms) and (rms > 0 or not top > 0):
        return rms
    if not top > 0:
        return values.new_zeros(())
    scaled = values / top * weights
    peak = scaled.abs().max()
    return (scaled / peak).square().mean().sqrt() * peak * top if peak > 0 else values.new_zeros(())


def _check_scales(source: str, y_scale: Tensor, x_scale: Tensor, lo: Tensor, hi: Tensor, dtype: torch.dtype) -> None:
    """Refuse scales whose squares (the factors of variances in user units) overflow or underflow ``dtype``.

    Checks the value scale ``sigma_y`` and every derivative factor ``sigma_y / s_a`` (the latter
    in log space, so that the check itself cannot overflow).

    Raises:
        ValueError: naming ``y`` (or ``grad``, when the scale comes from the derivatives) or ``X``.
    """
    low, high = scale_limits(dtype)
    limits = f"[{low:.2g}, {high:.2g}]"
    value = float(y_scale)
    if not low <= value <= high:
        raise ValueError(
            f"{source} is {value:.3g}, outside {limits}: variances in these units (its square) would "
            f"{'overflow' if not value <= high else 'underflow'} {dtype}; rescale the data (e.g. divide y and "
            "grad by a power of ten)"
        )
    log_factor = math.log(value) - x_scale.log()
    bad = (log_factor < math.log(low)) | (log_factor > math.log(high))
    if bool(bad.any()):
        a = int(torch.nonzero(bad)[0])
        factor = math.exp(float(log_factor[a])) if float(log_factor[a]) < 709.0 else math.inf
        raise ValueError(
            f"X: the range of column {a} ([{lo[a].item():.3g}, {hi[a].item():.3g}]) and the scale of y "
            f"({value:.3g}) make the derivative scale {factor:.3g} (scale of y / range), outside {limits}: "
            f"variances of derivatives would {'overflow' if float(log_factor[a]) > 0 else 'underflow'} {dtype}; "
            "rescale X or y"
        )
