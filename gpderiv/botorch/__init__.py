r"""BoTorch models with gradient observations: :class:`DerivativeGPModel`.

A single-task GP observed through values *and* partial derivatives that meets BoTorch's
``Model`` contract end to end: ``posterior`` (``batch x q x d`` inputs, ``output_indices`` that
select gradient outputs, observation noise, posterior transforms), ``condition_on_observations``
and ``fantasize`` with values and gradients (so ``qKnowledgeGradient`` on this model is d-KG),
``subset_output``, ``batch_shape``, QMC sampling and ``qLogNoisyExpectedImprovement``'s cached root.

Conventions (those of ``SingleTaskGP``): ``train_X`` is `n x d` (or `batch x n x d`),
``train_Y`` is `n x (1 + d)` holding ``[f, df/dx_1, ..., df/dx_d]`` per point, NaN marks an
entry that was not observed. Outputs are numbered the same way: output 0 is the objective,
output ``1 + a`` is :math:`\partial f / \partial x_a`. The model has one output (the objective)
unless ``outputs`` or :meth:`~DerivativeGPModel.subset_output` say otherwise.

Transforms must respect the chain rule, so both are affine and handled by the model:

* inputs ``u = (x - offset) / c`` (``Normalize``, ``InputStandardize``, any
  ``AffineInputTransform``): the model sees :math:`\partial f/\partial u_a = c_a\,\partial f/\partial x_a`;
* outcomes :class:`DerivativeStandardize`: :math:`\tilde f = (f - \mu)/\sigma` and
  :math:`\partial \tilde f = \partial f / \sigma` -- gradients are scaled but never centred.
  BoTorch's ``Standardize`` would centre and scale every column on its own, which is wrong
  for gradients, and is refused.

Posteriors are returned in the original units of ``x`` and ``f``. The model holds no linear
algebra of its own: it is wiring over the engines of :mod:`gpderiv.inference`, the same as
:class:`~gpderiv.DerivativeGP`'s. The observed entries are the rows of an
:class:`~gpderiv.observed_rows.ObservedRows` (unobserved entries are dropped, one missing pattern
shared by every batch member), the engine chosen by ``inference`` (``"auto"``, ``"dense"``,
``"iterative"``, ``"structured"`` or any registered name) factorises them once per hyperparameter
setting, and conditioning and fantasies grow that factor by the new rows
(:meth:`~gpderiv.inference.Factor.extend`). GPyTorch's interleaved layout is what users see;
the engines work in block layout, and :func:`~gpderiv.observed_rows.block_kernel` converts (:ref:`layouts`).

BoTorch is imported when this module is imported: ``pip install "gpderiv[botorch]"``.
"""

try:
    import botorch  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without botorch
    raise ImportError(
        "gpderiv.botorch needs BoTorch, which is not installed: pip install 'gpderiv[botorch]'"
    ) from err

from gpderiv.botorch.likelihood import DerivativeGaussianLikelihood
from gpderiv.botorch.model import DerivativeGPModel
from gpderiv.botorch.transforms import DerivativeStandardize

__all__ = ["DerivativeGaussianLikelihood", "DerivativeGPModel", "DerivativeStandardize"]
