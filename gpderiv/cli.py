"""Command line: ``gpderiv fit``, ``gpderiv predict`` and ``gpderiv demo`` (see docs/cli.md).

Errors in the user's files are reported on one line of stderr,
``gpderiv: error: <file>, row <r>, column <name>: <what>``, with exit code 2 and no output file
left behind (outputs are written to a temporary file in the target directory and renamed).
Rows are the lines of the CSV file: the header is row 1, the first data row is row 2.

Output paths are checked before anything is read or written (:func:`check_outputs`): an output
that is one of the inputs (under any spelling: relative or absolute, ``./``, a symbolic or hard
link), a directory, or a file in a directory that does not exist is refused with exit code 2.

Numbers in CSV cells are plain decimal or scientific notation (``12``, ``-0.5``, ``1.5e-3``,
``.5``, ``3.``), with spaces or tabs around them; ``nan`` (any case) or an empty cell means "not
observed" in y and grad columns. Other spellings that Python's ``float()`` would accept
(``1_000``, full-width or other non-ASCII digits, non-breaking spaces) are refused with the row and
column, because a CSV reader that accepts them reads data that other tools read differently.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gpderiv import __version__
from gpderiv._validation import as_seed
from gpderiv.datasets import franke_with_grad
from gpderiv.exceptions import CholeskyError, OptimizationWarning, ProblemTooLargeError
from gpderiv.inference import engine_names
from gpderiv.kernels.defaults import FAMILIES, default_kernel
from gpderiv.model import LOCAL_NEIGHBOURS, DerivativeGP
from gpderiv.persistence import PendingFile

__all__ = ["CLIError", "check_outputs", "main", "read_csv"]

PROG = "gpderiv"
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = "gpderiv.cli"
KERNELS = tuple(FAMILIES)  # rbf, matern52, matern32
_MISSING = ("", "nan")  # cells meaning "not observed" in y and grad columns (case-insensitive)
#: A number in a CSV cell: plain decimal or scientific notation, ASCII digits only.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_BLANK = " \t\r\n\f\v"  # ASCII whitespace around a cell's number (not, e.g., non-breaking spaces)


class CLIError(Exception):
    """A problem with a user's file, reported as ``<file>, row <r>, column <name>: <what>``."""

    def __init__(self, file: str, what: str, *, row: int | None = None, column: str | None = None) -> None:
        where = [os.fspath(file)]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column}")
        super().__init__(", ".join(where) + ": " + " ".join(what.split()))  # always one line


# ----------------------------------------------------------------------------- CSV input
@dataclass
class Table:
    """Columns of a CSV file parsed as floats, and the file row of each data row."""

    path: str
    header: list[str]
    rows: list[int]
    columns: dict[str, list[float]]


def read_csv(path: str, columns: Sequence[str], *, missing_ok: Sequence[str] = ()) -> Table:
    """Read the named columns of a CSV file with a header row as floats.

    Cells of columns in ``missing_ok`` may be empty or ``nan`` (any case), read as NaN; every
    other requested cell must be a finite number. Blank lines are skipped; other columns are
    not checked.

    Raises:
        CLIError: missing or unreadable file, empty file, bad header, missing column, a row
            with another number of fields than the header, a non-numeric or non-finite cell.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return _parse_csv(path, csv.reader(fh, strict=True), columns, set(missing_ok))
    except FileNotFoundError:
        raise CLIError(path, "no such file") from None
    except IsADirectoryError:
        raise CLIError(path, "is a directory, not a CSV file") from None
    except UnicodeDecodeError as exc:
        raise CLIError(path, f"not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise CLIError(path, f"cannot read ({exc.strerror or exc})") from None


def _parse_csv(path: str, reader: Any, columns: Sequence[str], missing_ok: set[str]) -> Table:
    records = _records(path, reader)
    try:
        line, header = next(records)
    except StopIteration:
        raise CLIError(path, "empty file (expected a header row)", row=1) from None
    header = [h.strip() for h in header]
    for j, name in enumerate(header):
        if not name:
            raise CLIError(path, f"empty column name in the header (field {j + 1})", row=line)
        if name in header[:j]:
            raise CLIError(path, "duplicate column name in the header", row=line, column=name)
    for name in columns:
        if name not in header:
            raise CLIError(path, f"no such column (the header has {', '.join(header)})", row=line, column=name)
    index = {name: header.index(name) for name in columns}
    table = Table(path, header, [], {name: [] for name in columns})
    for line, fields in records:
        if len(fields) < len(header):
            missing = header[len(fields)]
            raise CLIError(
                path, f"missing field: {len(fields)} fields, the header has {len(header)}", row=line, column=missing
            )
        if len(fields) > len(header):
            raise CLIError(path, f"{len(fields)} fields, the header has {len(header)}", row=line)
        table.rows.append(line)
        for name, j in index.items():
            table.columns[name].append(_number(path, line, name, fields[j], name in missing_ok))
    if not table.rows:
        raise CLIError(path, "no data rows after the header", row=line + 1)
    return table


def _records(path: str, reader: Any) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(row, fields)`` for the non-blank records; row = line number of the record's end."""
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise CLIError(path, f"malformed CSV ({exc})", row=reader.line_num) from None
        if fields and any(f.strip() for f in fields):
            yield reader.line_num, fields


def _number(path: str, row: int, column: str, cell: str, missing_ok: bool) -> float:
    """The number in a cell: plain decimal or scientific notation (see the module's docstring)."""
    text = cell.strip(_BLANK)
    if missing_ok and text.lower() in _MISSING:
        return math.nan
    if not text:
        raise CLIError(path, "empty cell (input columns must be finite numbers)", row=row, column=column)
    if _NUMBER.fullmatch(text):
        return float(text)
    if not _NON_FINITE.fullmatch(text):
        raise CLIError(
            path,
            f"not a number: {_short(text)!r} (expected plain decimal or scientific notation, e.g. 1000, -0.5, 1.5e-3)",
            row=row,
            column=column,
        )
    hint = "leave the cell empty or write nan for 'not observed'" if missing_ok else "input columns must be finite"
    raise CLIError(path, f"not a finite number: {text!r} ({hint})", row=row, column=column)


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(option: str, value: str) -> list[str]:
    names = [n.strip() for n in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{option}: empty column name in {value!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{option}: repeated column name in {value!r}")
    return names


# ----------------------------------------------------------------------------- atomic output
class _PendingFile(PendingFile):
    """:class:`gpderiv.persistence.PendingFile` whose OS errors are CLIErrors naming the target."""

    def __init__(self, path: str, write: Callable[[str], None]) -> None:
        try:
            super().__init__(path, write)
        except OSError as exc:
            raise CLIError(path, f"cannot write ({exc.strerror or exc})") from None


def _commit(*files: _PendingFile) -> None:
    """Rename the temporary files onto their targets in order; no temporary file is ever left behind.

    Raises:
        CLIError: a rename failed (the files not yet renamed are discarded).
    """
    try:
        for file in files:
            try:
                file.commit()
            except OSError as exc:
                raise CLIError(file.path, f"cannot write ({exc.strerror or exc})") from None
    finally:
        for file in files:
            file.discard()


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: :func:`os.path.samefile` when both exist (links, spellings)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(outputs: Sequence[tuple[str, str]], inputs: Sequence[tuple[str, str]]) -> None:
    """Refuse output paths that would replace an input or cannot be files, before anything is written.

    Args:
        outputs: ``(option, path)`` of each file the command will write, e.g. ``("--save", "m.pt")``.
        inputs: ``(what, path)`` of each file it reads, e.g. ``("input data file", "data.csv")``;
            paths that do not exist are ignored.

    Raises:
        CLIError: ``<option> <path>: <why>`` for an output that is an input or another output
            (under any spelling, or a link to it), a directory, or in a directory that does not exist.
    """
    taken = [(what, path) for what, path in inputs if os.path.exists(path)]
    for option, path in outputs:
        where = f"{option} {path}"
        if os.path.isdir(path) or path.endswith(tuple(filter(None, (os.sep, os.altsep)))):
            raise CLIError(where, "is a directory, expected the path of a file to write")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise CLIError(where, f"the directory {directory} does not exist")
        for what, other in taken:
            if _same_file(path, other):
                raise CLIError(where, f"is the {what} {other}; refusing to replace it: choose another output path")
        taken.append((f"output of {option}", path))


# ----------------------------------------------------------------------------- commands
def _run_model(file: str, action: Callable[[], object], quiet: tuple[type[Warning], ...] = ()) -> object:
    """Run a model call, turning its input errors into CLIErrors and its warnings (but ``quiet`` ones) into lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = action()
        except (ValueError, TypeError, CholeskyError, ProblemTooLargeError) as exc:
            raise CLIError(file, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    for w in caught:
        if not issubclass(w.category, quiet):
            print(f"{PROG}: warning: {str(w.message).splitlines()[0]}", file=sys.stderr)
    return result


def cmd_fit(args: argparse.Namespace) -> int:
    """``gpderiv fit``: read a CSV, fit a DerivativeGP, save it and its column names."""
    sidecar_path = args.save + SIDECAR_SUFFIX
    check_outputs(
        [("--save", args.save), ("--save's column-name file", sidecar_path)], [("input data file", args.data)]
    )
    x_cols, y_col, g_cols = args.x, args.y, args.grad
    if g_cols is not None and len(g_cols) != len(x_cols):
        args.parser.error(f"--grad names {len(g_cols)} columns, --x names {len(x_cols)}: give one per input")
    wanted = list(dict.fromkeys([*x_cols, y_col, *(g_cols or [])]))
    table = read_csv(args.data, wanted, missing_ok=[y_col, *(g_cols or [])])
    X = torch.tensor([table.columns[c] for c in x_cols], dtype=torch.float64).T
    y = torch.tensor(table.columns[y_col], dtype=torch.float64)
    grad = None if g_cols is None else torch.tensor([table.columns[c] for c in g_cols], dtype=torch.float64).T
    n, d = X.shape

    t0 = time.perf_counter()
    model = _run_model(
        args.data,
        lambda: DerivativeGP(X, y, grad, kernel=default_kernel(d, family=args.kernel), inference=args.inference).fit(
            maxiter=args.maxiter, restarts=args.restarts, seed=args.seed, progress=args.progress
        ),
    )
    elapsed = time.perf_counter() - t0

    sidecar = {"format": SIDECAR_FORMAT, "version": 1, "x": x_cols, "y": y_col, "grad": g_cols, "kernel": args.kernel}
    model_file = _PendingFile(args.save, model.save)
    try:
        sidecar_file = _PendingFile(sidecar_path, lambda p: _write_json(p, sidecar))
    except BaseException:
        model_file.discard()
        raise
    _commit(model_file, sidecar_file)
    print(
        f"fit: n={n} d={d} N={model.num_observations} observed, log ML {model.mll:.6g}, "
        f"kernel {args.kernel}, {elapsed:.2f} s -> {args.save}"
    )
    return 0


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")


def _read_sidecar(model_path: str) -> dict | None:
    path = model_path + SIDECAR_SUFFIX
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CLIError(path, f"unreadable column-name file ({exc})") from None
    x = obj.get("x") if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or obj.get("format") != SIDECAR_FORMAT or not _is_names(x):
        raise CLIError(path, f"not a gpderiv column-name file (expected format {SIDECAR_FORMAT!r} and a list 'x')")
    return obj


def _is_names(x: object) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(c, str) and c for c in x)


def cmd_predict(args: argparse.Namespace) -> int:
    """``gpderiv predict``: posterior mean (and std, gradient) at the points of a CSV."""
    check_outputs(
        [("--out", args.out)],
        [
            ("model file", args.model),
            ("model's column-name file", args.model + SIDECAR_SUFFIX),
            ("points file", args.points),
        ],
    )
    try:
        model = DerivativeGP.load(args.model)
    except FileNotFoundError:
        raise CLIError(args.model, "no such file") from None
    except ValueError as exc:
        raise CLIError(args.model, _strip_prefix(str(exc), args.model)) from None
    x_cols = args.x
    if x_cols is None:
        sidecar = _read_sidecar(args.model)
        if sidecar is None:
            raise CLIError(
                args.model,
                f"no column names: {args.model + SIDECAR_SUFFIX} (written by 'gpderiv fit') is missing; pass --x",
            )
        x_cols = sidecar["x"]
    if len(x_cols) != model.d:
        raise CLIError(
            args.model, f"the model has d={model.d} inputs, got {len(x_cols)} x columns ({','.join(x_cols)})"
        )
    table = read_csv(args.points, x_cols)
    Xs = torch.tensor([table.columns[c] for c in x_cols], dtype=torch.float64).T
    # Variances only when written; --local: upper bounds from the nearest training points (large data).
    std = args.std or args.local is not None
    variance = "local" if args.local else std
    neighbours = args.local or LOCAL_NEIGHBOURS
    pred = _run_model(args.points, lambda: model.predict(Xs, variance=variance, neighbours=neighbours))

    out_cols: list[str] = [*x_cols, "mean"]
    data: list[list[float]] = [Xs[:, a].tolist() for a in range(model.d)] + [pred.mean.tolist()]
    if std:
        out_cols.append("std")
        data.append(pred.std.tolist())
    if args.grad:
        for a, name in enumerate(x_cols):
            out_cols.append(f"grad_{name}")
            data.append(pred.grad_mean[:, a].tolist())
            if std:
                out_cols.append(f"grad_{name}_std")
                data.append(pred.grad_std[:, a].tolist())

    def write(path: str) -> None:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(out_cols)
            writer.writerows([repr(v) for v in row] for row in zip(*data, strict=True))

    _commit(_PendingFile(args.out, write))
    print(f"predict: {Xs.shape[0]} points -> {args.out} ({', '.join(out_cols)})")
    return 0


def _strip_prefix(message: str, path: str) -> str:
    """Drop a leading ``<path>: `` from a library message (the CLI names the file itself)."""
    return message[len(path) + 2 :] if message.startswith(path + ": ") else message


# ----------------------------------------------------------------------------- demo
DEMO_NOISE_STD = 0.05
DEMO_PNG = "gpderiv_demo.png"


def _grid(k: int) -> torch.Tensor:
    u = torch.linspace(0, 1, k, dtype=torch.float64)
    return torch.cartesian_prod(u, u)


def cmd_demo(args: argparse.Namespace) -> int:
    """``gpderiv demo``: Franke function, GP with gradients vs values only."""
    train_k, test_k, maxiter = (5, 20, 30) if args.smoke else (10, 50, None)
    X = _grid(train_k)
    f, g = franke_with_grad(X)
    noise = DEMO_NOISE_STD * torch.randn(X.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y, g = f + noise[:, 0], g + noise[:, 1:]
    Xs = _grid(test_k)
    f_true, g_true = franke_with_grad(Xs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizationWarning)  # a warm-up, kept out of the timings
        DerivativeGP(X[:4], y[:4], g[:4]).fit(maxiter=2).predict(X[:4])

    print(
        f"demo: Franke function, {train_k} x {train_k} training grid, noise std {DEMO_NOISE_STD}, "
        f"{test_k} x {test_k} test grid"
    )
    header = f"{'model':<12} {'N':>4} {'RMSE f':>9} {'RMSE grad':>10} {'log ML':>9} {'fit [s]':>8} {'pred [s]':>9}"
    print(header)
    print("-" * len(header))
    means = {}
    for label, gr in (("with grad", g), ("values only", None)):
        t0 = time.perf_counter()
        quiet = (OptimizationWarning,) if args.smoke else ()  # smoke: maxiter is capped on purpose
        model = _run_model("demo", lambda gr=gr: DerivativeGP(X, y, gr).fit(maxiter=maxiter), quiet)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = model.predict(Xs)
        pred_s = time.perf_counter() - t0
        rmse_f = (pred.mean - f_true).square().mean().sqrt().item()
        rmse_g = (pred.grad_mean - g_true).square().mean().sqrt().item()
        means[label] = (pred.mean, rmse_f)
        print(
            f"{label:<12} {model.num_observations:>4d} {rmse_f:>9.4f} {rmse_g:>10.4f} {model.mll:>9.1f} "
            f"{fit_s:>8.2f} {pred_s:>9.3f}"
        )

    png = os.path.join(args.out, DEMO_PNG)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise CLIError(args.out, f"cannot create the output directory ({exc.strerror or exc})") from None
    _PendingFile(png, lambda p: _demo_plot(p, Xs, f_true, means, test_k)).commit()
    print(f"wrote {png}")
    return 0


def _demo_plot(path: str, Xs: torch.Tensor, f_true: torch.Tensor, means: dict, k: int) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    grid = [Xs[:, j].reshape(k, k).numpy() for j in (0, 1)]
    panels = [("truth", f_true)] + [(f"GP mean, {lab} (RMSE {r:.4f})", m) for lab, (m, r) in means.items()]
    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 3)
    lo, hi = f_true.min().item(), f_true.max().item()
    for ax, (title, z) in zip(axes, panels, strict=True):
        im = ax.pcolormesh(*grid, z.reshape(k, k).numpy(), vmin=lo, vmax=hi, shading="auto")
        fig.colorbar(im, ax=ax)
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)


# ----------------------------------------------------------------------------- parser, main
def _column_list(option: str) -> Callable[[str], list[str]]:
    def parse(value: str) -> list[str]:
        return _names(option, value)

    parse.__name__ = "column list"
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``gpderiv`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Gaussian processes with derivative observations (see docs/cli.md)."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "fit",
        help="fit a GP to a CSV file and save it",
        description="Fit a DerivativeGP to the columns of a CSV file (with a header row) and save it. "
        "Empty or nan cells of the y and grad columns are 'not observed'.",
    )
    p.add_argument("data", help="CSV file with a header row")
    p.add_argument(
        "--x",
        required=True,
        type=_column_list("--x"),
        metavar="COLS",
        help="input columns, comma-separated (e.g. x1,x2)",
    )
    p.add_argument("--y", required=True, metavar="COL", help="value column")
    p.add_argument(
        "--grad",
        type=_column_list("--grad"),
        metavar="COLS",
        help="derivative columns df/dx, one per --x column, in the same order",
    )
    p.add_argument(
        "--save",
        required=True,
        metavar="MODEL",
        help=f"model file to write; the column names go to MODEL{SIDECAR_SUFFIX}",
    )
    p.add_argument("--kernel", choices=KERNELS, default="rbf", help="covariance kernel (default rbf)")
    p.add_argument(
        "--inference",
        choices=["auto", *engine_names()],
        default="auto",
        help="inference engine (default auto: chosen by the problem's size and structure)",
    )
    p.add_argument("--maxiter", type=_positive_int, default=None, help="L-BFGS iteration limit (default 200)")
    p.add_argument("--restarts", type=_nonneg_int, default=0, help="extra fits from random starts (default 0)")
    p.add_argument("--seed", type=_seed, default=None, help="seed of the random restarts")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="show a progress bar on stderr (default off)",
    )
    p.set_defaults(func=cmd_fit, parser=p)

    p = sub.add_parser(
        "predict",
        help="predict at the points of a CSV file",
        description="Posterior mean (and std, gradient) of a saved model at the points of a CSV file.",
    )
    p.add_argument("model", help="model file written by 'gpderiv fit'")
    p.add_argument("points", help="CSV file with a header row holding the model's x columns")
    p.add_argument("--out", required=True, metavar="CSV", help="output CSV file")
    p.add_argument(
        "--x",
        type=_column_list("--x"),
        metavar="COLS",
        help=f"input columns (default: the names stored in MODEL{SIDECAR_SUFFIX} by 'gpderiv fit')",
    )
    p.add_argument("--grad", action="store_true", help="also write the gradient, columns grad_<x>")
    p.add_argument("--std", action="store_true", help="also write posterior standard deviations")
    p.add_argument(
        "--local",
        type=_positive_int,
        metavar="K",
        help="write standard deviations given the K nearest training points only (implies --std; upper bounds "
        "of the exact ones, for data sets too large for exact variances per point)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "demo",
        help="Franke-function demo: gradients vs values only",
        description="Fit the Franke function on a 10 x 10 grid with noisy values and gradients, "
        "compare with a values-only GP on a 50 x 50 grid, and write a PNG.",
    )
    p.add_argument("--out", default=".", metavar="DIR", help=f"directory of {DEMO_PNG} (default .)")
    p.add_argument("--smoke", action="store_true", help="tiny fast version (5 x 5 grid, 30 iterations)")
    p.set_defaults(func=cmd_demo)
    return parser


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None


def _seed(value: str) -> int:
    try:
        return as_seed(_int(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("seed: ")) from None


def _positive_int(value: str) -> int:
    n = _int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def _nonneg_int(value: str) -> int:
    n = _int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return n


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad usage or bad input file)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except SystemExit as exc:  # --help, --version, usage errors (argparse prints them)
        return exc.code if isinstance(exc.code, int) else 2
    except CLIError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
