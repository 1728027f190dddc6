"""Saving and loading fitted models: the user's data, the options and the hyperparameters."""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from gpderiv.model import DerivativeGP

__all__ = ["FORMAT", "VERSION", "load_model", "save_model"]

#: The ``"format"`` entry of every model file; :func:`load_model` refuses files without it.
FORMAT = "gpderiv.DerivativeGP"
#: The file-format version written by :func:`save_model`; :func:`load_model` refuses newer ones.
VERSION = 1


def save_model(model: DerivativeGP, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` (a ``torch.save`` file).

    The file holds the training data in the user's units, the constructor options, the kernel
    module (so custom kernels round-trip) and the state dict. Loading rebuilds the model from
    them, which gives bit-identical predictions.
    """
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "init": {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in model._init_args.items()},
        "kernel": copy.deepcopy(model.covar_module).cpu(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "mll": model.mll,
        "mll_history": list(model.mll_history),
    }
    torch.save(payload, os.fspath(path))


def load_model(cls: type[DerivativeGP], path: str | os.PathLike) -> DerivativeGP:
    """Rebuild a model written by :func:`save_model` (on the CPU; use ``.to(device)`` after).

    The file is unpickled (it contains the kernel module): load only files you trust, as with
    ``torch.load``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is corrupt, or not a gpderiv model file, or of a newer format.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    try:
        payload: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a model file"
        raise ValueError(f"{path}: not a readable gpderiv model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a gpderiv model file (expected format {FORMAT!r})")
    if payload.get("version", 0) > VERSION:
        raise ValueError(
            f"{path}: written by a newer gpderiv (file format {payload['version']}, this version reads {VERSION})"
        )
    state = payload.get("state_dict", {})
    bad = [  # constraint bounds may legitimately be inf
        k
        for k, v in state.items()
        if "constraint" not in k and torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if bad:
        raise ValueError(f"{path}: corrupt gpderiv model file (non-finite values in {', '.join(bad)})")
    try:
        model = cls(**payload["init"], kernel=payload["kernel"])
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path}: corrupt gpderiv model file ({type(exc).__name__}: {exc})") from None
    model.mll, model.mll_history = payload.get("mll"), list(payload.get("mll_history", []))
    return model
