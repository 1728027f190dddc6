"""Saving and loading fitted models: safe, atomic model files.

A model file (format :data:`VERSION`) is a ``torch.save`` file holding only tensors and plain
Python data: the training data in the user's units and the constructor options, a plain
description of the kernel (allow-listed classes and their arguments, see
:mod:`gpderiv.kernels.description`), the state dict (every hyperparameter value) and the
marginal likelihood. It is read with ``torch.load(weights_only=True)`` and the kernel is rebuilt
from allow-listed classes only, so loading a file never runs code from it. Files are written to a
temporary file next to the target and renamed over it, so an interrupted save leaves no
half-written file.
"""

from __future__ import annotations

import io
import math
import os
import pickletools
import stat
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from gpderiv.kernels.description import build_kernel, describe_kernel

if TYPE_CHECKING:  # pragma: no cover
    from gpderiv.model import DerivativeGP

__all__ = ["FORMAT", "VERSION", "PendingFile", "load_model", "save_model"]

#: The ``"format"`` entry of every model file; :func:`load_model` refuses files without it.
FORMAT = "gpderiv.DerivativeGP"
#: The file-format version written by :func:`save_model`; :func:`load_model` reads only this one.
VERSION = 2
#: Bytes of pickle data scanned (never unpickled) to explain why a file was refused.
_SCAN_LIMIT = 2**24


class PendingFile:
    """An output written to a temporary file in the target's directory, renamed by :meth:`commit`.

    ``write(tmp_path)`` runs at construction; if it fails, the temporary file is removed and the
    error passes through. Until :meth:`commit` the target is untouched, so several outputs can be
    written first and committed together. The committed file gets the permissions ``open()`` would
    give it (``0o666`` less the umask), or keeps those of the file it replaces: the temporary file
    itself is private (``0o600``).

    Args:
        path: the target file.
        write: writes the content to the path it is given.

    Raises:
        IsADirectoryError: ``path`` is a directory (nothing is written).
        FileNotFoundError: the directory of ``path`` does not exist (nothing is written).
        OSError: the temporary file cannot be created; errors of ``write``.
    """

    def __init__(self, path: str | os.PathLike, write: Callable[[str], None]) -> None:
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        if os.path.isdir(self.path) or self.path.endswith(tuple(filter(None, (os.sep, os.altsep)))):
            raise IsADirectoryError(f"path: expected a file, got the directory {self.path!r}")
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"path: expected a file in an existing directory, got {self.path!r} (no directory {directory!r})"
            )
        fd, self.tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(self.path) + ".", suffix=".tmp")
        os.close(fd)
        try:
            write(self.tmp)
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        """Rename the temporary file onto the target (atomic on POSIX and Windows), with the usual permissions."""
        try:
            os.chmod(self.tmp, _file_mode(self.path))
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Remove the temporary file; the target is untouched."""
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def save_model(model: DerivativeGP, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` atomically, as a file of tensors and plain data only.

    The file holds the training data in the user's units and the constructor options
    (``model._init_args``), the kernel's description, the state dict, ``mll``, ``mll_history``
    and ``fitted``. :func:`load_model` rebuilds the model from them with bit-identical
    predictions.

    Raises:
        TypeError: the kernel contains a class, constraint, prior or transform that model files
            cannot hold (the message names it and lists what is allowed), or a constructor
            option is not plain data; nothing is written then.
        FileNotFoundError: the directory of ``path`` does not exist (``IsADirectoryError``: ``path`` is
            a directory); the message names ``path``.
        OSError: the file cannot be written; an existing file at ``path`` is left as it was.
    """
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "init": {k: _plain_data(v, f"model option {k}") for k, v in model._init_args.items()},
        "kernel": describe_kernel(model.covar_module),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "mll": None if model.mll is None else float(model.mll),
        "mll_history": [float(v) for v in model.mll_history],
        "fitted": bool(model.fitted),
    }
    PendingFile(path, lambda tmp: torch.save(payload, tmp)).commit()


def _file_mode(path: str) -> int:
    """The permission bits of the file at ``path``, or those of a new file (``0o666`` less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
        os.umask(mask)
        return 0o666 & ~mask


def _plain_data(value: Any, where: str) -> Any:
    """``value`` as CPU tensors and plain Python data (what ``weights_only=True`` reads back)."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_data(v, where) for v in value)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):  # e.g. inference_options
        return {k: _plain_data(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):  # numpy.float64 included
        return float(value)
    if hasattr(value, "__array__"):  # numpy arrays and scalars
        return torch.as_tensor(value)
    raise TypeError(f"{where}: expected tensors or plain Python data to save, got {type(value).__name__}")


def load_model(cls: type[DerivativeGP], path: str | os.PathLike) -> DerivativeGP:
    """Rebuild a model written by :func:`save_model` (on the CPU; use ``.to(device)`` after).

    The file is read with ``torch.load(weights_only=True)``, which refuses anything but tensors
    and plain data without running it, and the kernel is built from allow-listed classes only:
    loading never executes code from the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is corrupt, not a gpderiv model file, of the old (unsafe) format 1
            or a newer format, holds Python objects other than tensors and plain data, or names
            a kernel, constraint, prior or function that is not allowed.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes about pickle protocols of foreign files
            payload: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure means "not a model file we can read"
        raise ValueError(_refusal(path, exc)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a gpderiv model file (expected format {FORMAT!r})")
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{path}: corrupt gpderiv model file (expected an int version, got {version!r})")
    if version < VERSION:
        raise ValueError(_old_format(path, version))
    if version > VERSION:
        raise ValueError(f"{path}: written by a newer gpderiv (file format {version}, this version reads {VERSION})")
    state = payload.get("state_dict", {})
    bad = [  # constraint bounds may legitimately be +-inf, never NaN
        k
        for k, v in (state.items() if isinstance(state, dict) else [])
        if torch.is_tensor(v)
        and v.is_floating_point()
        and (v.isnan().any() if "constraint" in k else not torch.isfinite(v).all())
    ]
    mll, history = payload.get("mll"), payload.get("mll_history", [])
    if not isinstance(history, list):
        history = [history]
    bad += [k for k, v in (("mll", [mll]), ("mll_history", history)) if not all(_finite_or_none(x) for x in v)]
    if bad:
        raise ValueError(f"{path}: corrupt gpderiv model file (non-finite values in {', '.join(bad)})")
    try:
        kernel = build_kernel(payload["kernel"])
    except ValueError as exc:
        raise ValueError(f"{path}: not a safe gpderiv model file of format {VERSION}: {exc}") from None
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path}: corrupt gpderiv model file ({type(exc).__name__}: {exc})") from None
    try:
        # Files written before these options existed were fitted by plain maximum likelihood and predicted
        # with plug-in variances: they load as they were.
        init = {"noise_prior": False, "hyperparameter_uncertainty": False, **payload["init"]}
        model = cls(**init, kernel=kernel)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: corrupt gpderiv model file ({type(exc).__name__}: {exc})") from None
    model.mll, model.mll_history = payload.get("mll"), list(payload.get("mll_history", []))
    fitted = payload.get("fitted", model.mll is not None)  # files without the entry: fitted when they have an mll
    if not isinstance(fitted, bool):
        raise ValueError(f"{path}: corrupt gpderiv model file (expected a bool 'fitted', got {fitted!r})")
    model.fitted = fitted
    model.prepare_uncertainty()
    return model


def _finite_or_none(value: Any) -> bool:
    """Whether a stored log marginal likelihood is None or a finite number."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


def _old_format(path: str, version: int) -> str:
    return (
        f"{path}: gpderiv model file of the old format {version}, which stores the kernel as a pickled Python "
        f"object and cannot be read safely (unpickling it could run code from the file); it was not loaded. "
        f"To recover: re-fit the model and save it again, or, only if you trust the file, load it with the gpderiv "
        f"version that wrote it and re-save it in format {VERSION} as described in docs/user_guide.md (Model files)"
    )


def _refusal(path: str, exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, from a scan of its pickle (no unpickling)."""
    found = _scan_pickle(path)
    if found is not None:
        strings, globals_, version = found
        version = 1 if version is None else version
        if FORMAT in strings and version < VERSION:
            return _old_format(path, version)
        foreign = [g for g in globals_ if not g.startswith(("torch.", "collections."))]
        if foreign:
            return (
                f"{path}: not a safe gpderiv model file of format {VERSION}: it holds Python objects "
                f"({', '.join(dict.fromkeys(foreign[:3]))}) that are refused without being unpickled, because "
                "unpickling them could run code; model files hold only tensors and plain data"
            )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if os.path.getsize(path) == 0:
        reason = "empty file"
    elif not zipfile.is_zipfile(path):
        reason = "not a complete file written by torch.save: truncated, or another kind of file"
    else:
        reason = f"{type(exc).__name__}: {first}"
    return f"{path}: not a readable gpderiv model file ({reason})"


def _scan_pickle(path: str) -> tuple[set[str], list[str], int | None] | None:
    """``(strings, globals, version)`` of the pickle data in ``path``, by reading opcodes only.

    ``pickletools.genops`` decodes opcodes without executing them. For a ``torch.save`` zip
    archive the scanned data is its ``data.pkl``; otherwise the file itself (a legacy torch file
    or a bare pickle, whose consecutive pickles are scanned until one does not parse). ``globals``
    are the ``module.name`` of every class or function the pickle would import; ``version`` is the
    int stored under a ``"version"`` key. None when nothing parses.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                with archive.open(name) as fh:
                    data = fh.read(_SCAN_LIMIT)
        else:
            with open(path, "rb") as fh:
                data = fh.read(_SCAN_LIMIT)
    except (OSError, StopIteration, zipfile.BadZipFile):
        return None
    strings: set[str] = set()
    globals_: list[str] = []
    version: int | None = None
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # recent values pushed as strings or ints (memo lookups resolved)
    stream = io.BytesIO(data)
    ops = 0
    try:
        while stream.tell() < len(data):
            for op, arg, _ in pickletools.genops(stream):
                ops += 1
                if isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                    strings.add(arg)
                    pushed.append(arg)
                elif op.name in ("BININT", "BININT1", "BININT2", "INT", "LONG1"):
                    if pushed and pushed[-1] == "version" and isinstance(arg, int):
                        version = arg
                    pushed.append(arg)
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    memo[arg if op.name != "MEMOIZE" else len(memo)] = pushed[-1] if pushed else None
                elif op.name in ("GLOBAL", "INST"):  # protocol 2 names builtins __builtin__
                    globals_.append(str(arg).replace(" ", ".").replace("__builtin__.", "builtins."))
                elif op.name == "STACK_GLOBAL" and len(pushed) >= 2:
                    globals_.append(f"{pushed[-2]}.{pushed[-1]}")
                    pushed.append(None)
                else:
                    pushed.append(None)
    except ValueError:  # truncated, or the bytes after the last pickle
        pass
    return (strings, globals_, version) if ops else None
