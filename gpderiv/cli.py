"""Command line: ``gpderiv fit``, ``gpderiv predict`` and ``gpderiv demo`` (see docs/cli.md).

Errors in the user's files are reported on one line of stderr,
``gpderiv: error: <file>, row <r>, column <name>: <what>``, with exit code 2 and no output file
left behind; so are a problem too large for the memory available (``ProblemTooLargeError``) and
an allocator's failure (``MemoryError``, torch's out-of-memory ``RuntimeError``). The files
themselves (CSV reading, output paths, atomic writes) are handled in :mod:`gpderiv.cli_io`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TextIO

import torch

from gpderiv import __version__
from gpderiv._validation import as_seed
from gpderiv.block_prediction import LOCAL_NEIGHBOURS
from gpderiv.cli_io import CLIError, _commit, _PendingFile, _write_json, check_outputs, read_csv
from gpderiv.datasets import franke_with_grad
from gpderiv.exceptions import CholeskyError, OptimizationWarning, ProblemTooLargeError
from gpderiv.inference import engine_names
from gpderiv.kernels.defaults import FAMILIES, default_kernel
from gpderiv.model import DerivativeGP

__all__ = ["main"]

PROG = "gpderiv"
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = "gpderiv.cli"
KERNELS = tuple(FAMILIES)  # rbf, matern52, matern32
def _names(option: str, value: str) -> list[str]:
    names = [n.strip() for n in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{option}: empty column name in {value!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{option}: repeated column name in {value!r}")
    return names


#: How torch's allocators word a failed allocation ("DefaultCPUAllocator: can't allocate memory",
#: "CUDA out of memory"), in lower case.
OUT_OF_MEMORY_PHRASES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation: a ``MemoryError`` or torch's out-of-memory ``RuntimeError``."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(p in str(exc).lower() for p in OUT_OF_MEMORY_PHRASES)


def memory_message(exc: BaseException) -> str:
    """One line for a failed allocation: the library's own message, or the allocator's with what to do."""
    lines = str(exc).splitlines()
    first = lines[0] if lines else ""
    if isinstance(exc, ProblemTooLargeError):
        return first or type(exc).__name__
    detail = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", first) or type(exc).__name__
    return (
        f"out of memory ({detail}); use fewer observations or test points (a smaller CSV), "
        "or a machine with more memory"
    )


def _run_model(file: str, action: Callable[[], object], quiet: tuple[type[Warning], ...] = ()) -> object:
    """Run a model call, turning its input errors into CLIErrors and its warnings (but ``quiet`` ones) into lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = action()
        except (ValueError, TypeError, CholeskyError, ProblemTooLargeError) as exc:
            raise CLIError(file, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        except (MemoryError, RuntimeError) as exc:
            if not out_of_memory(exc):
                raise
            raise CLIError(file, memory_message(exc)) from None
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
        lambda: DerivativeGP(
            X,
            y,
            grad,
            kernel=default_kernel(d, family=args.kernel),
            inference=args.inference,
            inference_options=None if args.inducing is None else {"num_inducing": args.inducing},
        ).fit(
            maxiter=args.maxiter,
            restarts=args.restarts,
            seed=args.seed,
            progress=args.progress,
            time_budget=args.time_budget,
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
    to_stdout = args.out == "-"  # the predictions go to standard output, everything else to stderr
    check_outputs(
        [] if to_stdout else [("--out", args.out)],
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
    except ProblemTooLargeError as exc:  # its engine does not fit in the memory available here
        raise CLIError(args.model, str(exc).splitlines()[0]) from None
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

    def write_rows(fh: TextIO) -> None:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(out_cols)
        writer.writerows([repr(v) for v in row] for row in zip(*data, strict=True))

    def write(path: str) -> None:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            write_rows(fh)

    summary = f"predict: {Xs.shape[0]} points -> {'standard output' if to_stdout else args.out} ({', '.join(out_cols)})"
    if to_stdout:
        write_rows(sys.stdout)
        sys.stdout.flush()
        print(summary, file=sys.stderr)
        return 0
    _commit(_PendingFile(args.out, write))
    print(summary)
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

    from gpderiv.plot import plot_map, save_figure

    u = Xs[::k, 0].numpy()  # the grid of _grid: the first coordinate runs slowest, both over u
    panels = [("truth", f_true)] + [(f"GP mean, {lab} (RMSE {r:.4f})", m) for lab, (m, r) in means.items()]
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    lo, hi = f_true.min().item(), f_true.max().item()
    for ax, (title, z) in zip(fig.subplots(1, 3), panels, strict=True):
        # Rows of the reshaped grid follow x1; plot_map wants rows along x2.
        plot_map(z.reshape(k, k).numpy().T, u, u, ax=ax, label="f (Franke function)", vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=10)
    save_figure(fig, path, format="png")  # path is a temporary file (.tmp)


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
    p.add_argument(
        "--inducing",
        type=_positive_int,
        default=None,
        metavar="M",
        help="inducing points of --inference variational (default: 512 inducing variables' worth)",
    )
    p.add_argument(
        "--maxiter", type=_positive_int, default=None, help="optimiser iteration limit (default 200 L-BFGS, 1000 Adam)"
    )
    p.add_argument("--restarts", type=_nonneg_int, default=0, help="extra fits from random starts (default 0)")
    p.add_argument(
        "--time-budget",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="stop the hyperparameter fit after this many seconds, keeping what it reached (default: no limit)",
    )
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
    p.add_argument("--out", required=True, metavar="CSV", help="output CSV file, or - for standard output")
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


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return x


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
    except BrokenPipeError:  # `--out - | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except (MemoryError, RuntimeError) as exc:  # outside a model call: loading, saving, the demo
        if not out_of_memory(exc):
            raise
        print(f"{PROG}: error: {memory_message(exc)}", file=sys.stderr)
        return 2
