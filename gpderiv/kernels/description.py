"""Plain descriptions of kernels: what a model file stores instead of a pickled kernel module.

A description is a nested dict of plain Python data and tensors, e.g. ::

    {"class": "ScaleKernel",
     "args": {"outputscale_constraint": {"class": "Positive", "args": {...}, "raw_initial_value": None}},
     "children": {"base_kernel": {"class": "DerivativeRBFKernel",
                                  "args": {"layout": "block", "ard_num_dims": 2, "batch_shape": [], ...},
                                  "children": {}}}}

Only the classes of an allow-list are described and built: the gpderiv derivative kernels, the
plain GPyTorch kernels that :class:`~gpderiv.kernels.DerivativeKernel` wraps, ``ScaleKernel``,
``AdditiveKernel``, ``ProductKernel``, the usual constraints and priors, and a few named
transform functions. :func:`build_kernel` instantiates nothing else, so a description read from
an untrusted file cannot run code. Hyperparameter values are not part of a description: they
travel in the state dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from gpytorch.constraints import GreaterThan, Interval, LessThan, Positive
from gpytorch.constraints import constraints as _constraints
from gpytorch.kernels import (
    AdditiveKernel,
    Kernel,
    LinearKernel,
    MaternKernel,
    PeriodicKernel,
    PolynomialKernel,
    ProductKernel,
    RBFKernel,
    RQKernel,
    ScaleKernel,
)
from gpytorch.priors import GammaPrior, HalfCauchyPrior, HalfNormalPrior, LogNormalPrior, NormalPrior, UniformPrior
from gpytorch.priors.prior import Prior
from gpytorch.utils.transforms import inv_sigmoid, inv_softplus
from torch import Tensor

from gpderiv.kernels.composition import child_kernels, walk
from gpderiv.kernels.derivative_kernel import DerivativeKernel
from gpderiv.kernels.derivative_matern32_kernel import DerivativeMatern32Kernel
from gpderiv.kernels.derivative_matern52_kernel import DerivativeMatern52Kernel
from gpderiv.kernels.derivative_rbf_kernel import DerivativeRBFKernel

__all__ = ["ALLOWED_KERNELS", "build_kernel", "describe_kernel", "same_description"]


@dataclass(frozen=True)
class _KernelSpec:
    """How to describe and rebuild one allowed kernel class.

    Attributes:
        attrs: constructor arguments kept as attributes of the same name (``layout``, ``nu``, ...).
        kernel_args: whether the constructor takes GPyTorch's ``ard_num_dims``, ``batch_shape``,
            ``active_dims``.
        hypers: hyperparameters ``h`` whose constraint is the constructor argument ``h_constraint``.
        priors: those of ``hypers`` whose prior is the constructor argument ``h_prior``.
        children: ``"base_kernel"`` (one sub-kernel, the first positional argument), ``"kernels"``
            (the positional arguments of a sum or product) or None (a leaf).
    """

    cls: type[Kernel]
    attrs: tuple[str, ...] = ()
    kernel_args: bool = True
    hypers: tuple[str, ...] = ()
    priors: tuple[str, ...] = ()
    children: str | None = None

    def arg_names(self) -> set[str]:
        names = set(self.attrs) | {f"{h}_constraint" for h in self.hypers} | {f"{h}_prior" for h in self.priors}
        return names | ({"ard_num_dims", "batch_shape", "active_dims"} if self.kernel_args else set())


_LENGTHSCALE = {"hypers": ("lengthscale",), "priors": ("lengthscale",)}
_KERNEL_SPECS = (
    _KernelSpec(DerivativeRBFKernel, attrs=("layout",), **_LENGTHSCALE),
    _KernelSpec(DerivativeMatern32Kernel, attrs=("layout",), **_LENGTHSCALE),
    _KernelSpec(DerivativeMatern52Kernel, attrs=("layout",), **_LENGTHSCALE),
    _KernelSpec(DerivativeKernel, attrs=("layout",), kernel_args=False, children="base_kernel"),
    _KernelSpec(ScaleKernel, hypers=("outputscale",), priors=("outputscale",), children="base_kernel"),
    _KernelSpec(AdditiveKernel, kernel_args=False, children="kernels"),
    _KernelSpec(ProductKernel, kernel_args=False, children="kernels"),
    _KernelSpec(RBFKernel, **_LENGTHSCALE),
    _KernelSpec(MaternKernel, attrs=("nu",), **_LENGTHSCALE),
    _KernelSpec(RQKernel, hypers=("lengthscale", "alpha"), priors=("lengthscale",)),
    _KernelSpec(PeriodicKernel, hypers=("lengthscale", "period_length"), priors=("lengthscale", "period_length")),
    _KernelSpec(LinearKernel, hypers=("variance",), priors=("variance",)),
    _KernelSpec(PolynomialKernel, attrs=("power",), hypers=("offset",), priors=("offset",)),
)
#: The kernel classes a description may name, by name.
ALLOWED_KERNELS: dict[str, type[Kernel]] = {spec.cls.__name__: spec.cls for spec in _KERNEL_SPECS}
_BY_NAME = {spec.cls.__name__: spec for spec in _KERNEL_SPECS}
_BY_CLASS = {spec.cls: spec for spec in _KERNEL_SPECS}

#: Constraint classes and their bound arguments.
_CONSTRAINTS: dict[str, tuple[type[Interval], tuple[str, ...]]] = {
    "Interval": (Interval, ("lower_bound", "upper_bound")),
    "GreaterThan": (GreaterThan, ("lower_bound",)),
    "LessThan": (LessThan, ("upper_bound",)),
    "Positive": (Positive, ()),
}
#: Prior classes and their (constructor argument, attribute) pairs.
_PRIORS: dict[str, tuple[type[Prior], tuple[tuple[str, str], ...]]] = {
    "NormalPrior": (NormalPrior, (("loc", "loc"), ("scale", "scale"))),
    "LogNormalPrior": (LogNormalPrior, (("loc", "loc"), ("scale", "scale"))),
    "GammaPrior": (GammaPrior, (("concentration", "concentration"), ("rate", "rate"))),
    "UniformPrior": (UniformPrior, (("a", "low"), ("b", "high"))),
    "HalfCauchyPrior": (HalfCauchyPrior, (("scale", "scale"),)),
    "HalfNormalPrior": (HalfNormalPrior, (("scale", "scale"),)),
}
#: Transforms of constraints and priors, by name (compared by identity).
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "softplus": _constraints.softplus,  # GPyTorch's default, a torch.nn.Softplus()
    "torch.nn.functional.softplus": F.softplus,
    "torch.sigmoid": torch.sigmoid,
    "torch.exp": torch.exp,
    "torch.log": torch.log,
    "inv_softplus": inv_softplus,
    "inv_sigmoid": inv_sigmoid,
}


# ----------------------------------------------------------------------------- describe
def describe_kernel(kernel: Kernel, name: str = "kernel") -> dict[str, Any]:
    """The plain description of ``kernel`` (see the module docstring); :func:`build_kernel` inverts it.

    Args:
        kernel: a kernel made of allowed classes (:data:`ALLOWED_KERNELS`), constraints and priors.
        name: how error messages call ``kernel``.

    Returns:
        A nested dict of str, int, float, bool, None, lists and CPU tensors.

    Raises:
        TypeError: a part of ``kernel`` is not allowed (the message names it and lists what is), or
            it holds something its constructor arguments do not rebuild (a prior on a custom
            function of the parameters, an extra parameter).
    """
    for path, node in walk(kernel):
        if type(node) not in _BY_CLASS:
            raise TypeError(
                f"{_join(name, path)}: {_qualname(node)} cannot be saved: model files hold only kernels of the "
                f"allow-list ({', '.join(ALLOWED_KERNELS)}), built from their constructor arguments, constraints "
                f"({', '.join(_CONSTRAINTS)}) and priors ({', '.join(_PRIORS)})"
            )
    description = _describe(kernel, name)
    _check_rebuild(kernel, description, name)
    return description


def _describe(kernel: Kernel, where: str) -> dict[str, Any]:
    spec = _BY_CLASS[type(kernel)]
    args: dict[str, Any] = {a: _plain(getattr(kernel, a), f"{where}.{a}", TypeError) for a in spec.attrs}
    if spec.kernel_args:
        if kernel.ard_num_dims is not None:
            args["ard_num_dims"] = int(kernel.ard_num_dims)
        args["batch_shape"] = list(kernel._batch_shape)  # the constructor's, not broadcast with children
        if kernel.active_dims is not None:
            args["active_dims"] = [int(i) for i in kernel.active_dims.tolist()]
    constraints, priors = dict(kernel._constraints), dict(kernel._priors)
    for h in spec.hypers:
        if f"raw_{h}_constraint" in constraints:
            constraint = constraints.pop(f"raw_{h}_constraint")
            args[f"{h}_constraint"] = _describe_constraint(constraint, f"{where}.{h}_constraint")
    for h in spec.priors:
        if f"{h}_prior" in priors:
            args[f"{h}_prior"] = _describe_prior(priors.pop(f"{h}_prior")[0], f"{where}.{h}_prior")
    extras = [*constraints, *priors]
    if extras:
        takes = [f"{h}_constraint" for h in spec.hypers] + [f"{h}_prior" for h in spec.priors]
        raise TypeError(
            f"{where}.{extras[0]}: cannot be saved: model files hold the constraints and priors that "
            f"{type(kernel).__name__} takes as constructor arguments ({', '.join(takes) or 'none'})"
        )
    children = {child: _describe(sub, f"{where}.{child}") for child, sub in child_kernels(kernel)}
    return {"class": type(kernel).__name__, "args": args, "children": children}


def _describe_constraint(constraint: Any, where: str) -> dict[str, Any]:
    name = type(constraint).__name__
    if name not in _CONSTRAINTS or type(constraint) is not _CONSTRAINTS[name][0]:
        raise TypeError(
            f"{where}: constraint {_qualname(constraint)} cannot be saved; model files hold {', '.join(_CONSTRAINTS)}"
        )
    args: dict[str, Any] = {b: _tensor(getattr(constraint, b)) for b in _CONSTRAINTS[name][1]}
    args["transform"] = _function_name(constraint._transform, f"{where} constraint transform")
    args["inv_transform"] = _function_name(constraint._inv_transform, f"{where} constraint inv_transform")
    raw = constraint.initial_value  # already through the inverse transform: set back as it is
    return {"class": name, "args": args, "raw_initial_value": None if raw is None else _tensor(raw)}


def _describe_prior(prior: Any, where: str) -> dict[str, Any]:
    name = type(prior).__name__
    if name not in _PRIORS or type(prior) is not _PRIORS[name][0]:
        raise TypeError(f"{where}: prior {_qualname(prior)} cannot be saved; model files hold {', '.join(_PRIORS)}")
    args: dict[str, Any] = {arg: _tensor(getattr(prior, attr)) for arg, attr in _PRIORS[name][1]}
    args["validate_args"] = bool(prior._validate_args)
    args["transform"] = _function_name(prior._transform, f"{where} transform")
    return {"class": name, "args": args}


def _check_rebuild(kernel: Kernel, description: dict[str, Any], name: str) -> None:
    """Raise TypeError unless ``description`` rebuilds ``kernel``: state dict and prior functions."""
    rebuilt = build_kernel(description, name)
    try:
        rebuilt.load_state_dict(kernel.state_dict())
    except RuntimeError as exc:
        raise TypeError(
            f"{name}: holds parameters or buffers that its constructor arguments do not rebuild, so it cannot be "
            f"saved ({' '.join(str(exc).split())})"
        ) from None
    reference = _prior_closures(rebuilt)
    for key, closure in _prior_closures(kernel).items():
        if _code(closure) is not _code(reference.get(key)):
            raise TypeError(
                f"{_join(name, key[0])}.{key[1]}: a prior registered on a custom function of the parameters cannot "
                f"be saved; pass it to the constructor ({key[1]}=...) instead"
            )


def _prior_closures(kernel: Kernel) -> dict[tuple[str, str], Any]:
    """``{(path, prior name): closure}``: the function of the parameters each prior applies to."""
    return {(path, n): entry[1] for path, node in walk(kernel) for n, entry in node._priors.items()}


def _code(fn: Any) -> Any:
    return getattr(getattr(fn, "__func__", fn), "__code__", fn)


def _function_name(fn: Any, where: str) -> str | None:
    if fn is None:
        return None
    for name, known in _FUNCTIONS.items():
        if fn is known:
            return name
    raise TypeError(
        f"{where}: {getattr(fn, '__name__', type(fn).__name__)} cannot be saved; model files hold None or one of "
        f"{', '.join(_FUNCTIONS)}"
    )


def _plain(value: Any, where: str, error: type[Exception]) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise error(f"{where}: expected a str, int, float, bool or None, got {type(value).__name__}")


def _tensor(value: Any) -> Tensor:
    return torch.as_tensor(value).detach().cpu().clone()


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _join(name: str, path: str) -> str:
    return f"{name}.{path}" if path else name


def same_description(a: Any, b: Any) -> bool:
    """Whether two descriptions are equal: the same nested keys in order, tensors equal in value and dtype."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_description(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_description, a, b))
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


# ----------------------------------------------------------------------------- build
def build_kernel(description: Any, name: str = "kernel") -> Kernel:
    """A new kernel from a description written by :func:`describe_kernel`.

    Only allow-listed classes and functions are looked up, by name; nothing else in
    ``description`` is called or imported. Hyperparameter values are those of a new kernel: load
    the saved state dict afterwards.

    Args:
        description: the nested dict (untrusted: every entry is checked).
        name: how error messages call the kernel.

    Raises:
        ValueError: a class or function that is not allowed, or a malformed description (the
            message names the entry). The constructors' own errors pass through.
    """
    spec = _BY_NAME[_class_name(description, _BY_NAME, "kernel class", name)]
    args = _entries(description, "args", name)
    unknown = sorted(set(args) - spec.arg_names())
    if unknown:
        raise ValueError(f"{name}: {spec.cls.__name__} takes no argument {unknown[0]!r} (got {sorted(args)})")
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        where = f"{name}.{key}"
        if key.endswith("_constraint"):
            kwargs[key] = _build_constraint(value, where)
        elif key.endswith("_prior"):
            kwargs[key] = _build_prior(value, where)
        elif key == "batch_shape":
            kwargs[key] = torch.Size(_ints(value, where))
        elif key == "active_dims":
            kwargs[key] = tuple(_ints(value, where))
        else:
            kwargs[key] = _plain(value, where, ValueError)
    children = _entries(description, "children", name)
    expected = {"base_kernel": ["base_kernel"], "kernels": [f"kernels.{i}" for i in range(len(children))]}
    names = expected.get(spec.children or "", [])
    if list(children) != names or (spec.children == "kernels" and not names):
        raise ValueError(
            f"{name}: {spec.cls.__name__} expects sub-kernels {names or 'kernels.0, ...'}, got {list(children)}"
        )
    subs = [build_kernel(children[child], f"{name}.{child}") for child in names]
    return spec.cls(*subs, **kwargs)


def _build_constraint(description: Any, where: str) -> Interval:
    cls, bounds = _CONSTRAINTS[_class_name(description, _CONSTRAINTS, "constraint class", where)]
    args = _entries(description, "args", where)
    if set(args) != {*bounds, "transform", "inv_transform"}:
        raise ValueError(
            f"{where}: expected the arguments {[*bounds, 'transform', 'inv_transform']}, got {sorted(args)}"
        )
    kwargs = {b: _float_tensor(args[b], f"{where}.{b}") for b in bounds}
    funcs = {k: _function(args[k], f"{where}.{k}") for k in ("transform", "inv_transform")}
    constraint = cls(**kwargs, **funcs)
    raw = description.get("raw_initial_value")
    if raw is not None:
        constraint._initial_value = _float_tensor(raw, f"{where}.raw_initial_value")
    return constraint


def _build_prior(description: Any, where: str) -> Prior:
    cls, params = _PRIORS[_class_name(description, _PRIORS, "prior class", where)]
    args = _entries(description, "args", where)
    names = [arg for arg, _ in params]
    if set(args) != {*names, "validate_args", "transform"}:
        raise ValueError(
            f"{where}: expected the arguments {[*names, 'validate_args', 'transform']}, got {sorted(args)}"
        )
    kwargs = {arg: _float_tensor(args[arg], f"{where}.{arg}") for arg in names}
    if not isinstance(args["validate_args"], bool):
        raise ValueError(f"{where}.validate_args: expected a bool, got {type(args['validate_args']).__name__}")
    return cls(
        **kwargs, validate_args=args["validate_args"], transform=_function(args["transform"], f"{where}.transform")
    )


def _class_name(description: Any, allowed: dict[str, Any], what: str, where: str) -> str:
    if not isinstance(description, dict):
        raise ValueError(f"{where}: expected a description (a dict), got {type(description).__name__}")
    name = description.get("class")
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(
            f"{where}: {what} {name!r} is not allowed in a model file (allowed: {', '.join(allowed)}); "
            "it was not loaded"
        )
    return name


def _entries(description: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    entries = description.get(key, {})
    if not isinstance(entries, dict) or not all(isinstance(k, str) for k in entries):
        raise ValueError(f"{where}.{key}: expected a dict with str keys, got {type(entries).__name__}")
    return entries


def _function(name: Any, where: str) -> Callable[..., Any] | None:
    if name is None:
        return None
    if not isinstance(name, str) or name not in _FUNCTIONS:
        raise ValueError(
            f"{where}: function {name!r} is not allowed in a model file (allowed: {', '.join(_FUNCTIONS)})"
        )
    return _FUNCTIONS[name]


def _ints(value: Any, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where}: expected a list of ints, got {value!r}")
    return list(value)


def _float_tensor(value: Any, where: str) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise ValueError(f"{where}: expected a floating-point tensor, got {type(value).__name__}")
    return value
