"""The command line (gpderiv.cli): fit / predict round trip, demo, help, and one-line file errors.

Most cases call ``main([...])`` in-process; a few run ``python -m gpderiv`` in a subprocess to
check the real exit code, stderr and the absence of tracebacks.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpderiv import DerivativeGP
from gpderiv.cli import CLIError, _PendingFile, main

X_COLS = ["x1", "x2"]
FIT_ARGS = ["--x", "x1,x2", "--y", "f", "--grad", "df_dx1,df_dx2"]
HEADER = "x1,x2,f,df_dx1,df_dx2\n"


def truth(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.sin(3 * X[:, 0]) + np.cos(2 * X[:, 1])
    g = np.stack([3 * np.cos(3 * X[:, 0]), -2 * np.sin(2 * X[:, 1])], axis=1)
    return f, g


def write_training_csv(path: Path) -> int:
    """n = 15, d = 2, some empty / nan gradient cells; returns the number of observed entries."""
    X = np.random.default_rng(0).uniform(0, 1, (15, 2))
    f, g = truth(X)
    observed = 0
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["x1", "x2", "f", "df_dx1", "df_dx2"])
        for i in range(15):
            cells = [repr(float(v)) for v in (X[i, 0], X[i, 1], f[i], g[i, 0], g[i, 1])]
            if i % 4 == 0:
                cells[3] = ""
            if i % 5 == 1:
                cells[4] = "NaN" if i % 2 else "nan"
            observed += sum(c.lower() not in ("", "nan") for c in cells[2:])
            writer.writerow(cells)
    return observed


def read_output(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], np.array(rows[1:], dtype=float)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpderiv", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A model fitted once by ``gpderiv fit``: (directory, model path, observed count, stdout)."""
    d = tmp_path_factory.mktemp("cli_fit")
    observed = write_training_csv(d / "data.csv")
    model = d / "model.pt"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["fit", str(d / "data.csv"), *FIT_ARGS, "--save", str(model)])
    assert code == 0
    return d, model, observed, out.getvalue()


def test_fit_with_a_chosen_engine(tmp_path):
    write_training_csv(tmp_path / "data.csv")
    with contextlib.redirect_stdout(io.StringIO()):
        args = ["fit", str(tmp_path / "data.csv"), *FIT_ARGS, "--inference", "dense", "--save", str(tmp_path / "m.pt")]
        code = main(args)
    assert code == 0
    assert DerivativeGP.load(tmp_path / "m.pt").inference == "dense"
    assert main(["fit", "data.csv", *FIT_ARGS, "--inference", "cholesky", "--save", "m.pt"]) == 2  # argparse


def test_fit_variational_with_inducing_points(tmp_path, capsys):
    write_training_csv(tmp_path / "data.csv")
    base = ["fit", str(tmp_path / "data.csv"), *FIT_ARGS, "--save", str(tmp_path / "m.pt")]
    assert main([*base, "--inference", "variational", "--inducing", "6", "--maxiter", "20"]) == 0
    model = DerivativeGP.load(tmp_path / "m.pt")
    assert model.inference == "variational" and model.engine_state.Z.shape == (6, 2)
    # --inducing is an option of the variational engine: the dense engine refuses it with a reason
    assert main([*base, "--inference", "dense", "--inducing", "6"]) != 0
    assert "num_inducing" in capsys.readouterr().err


def test_help_subprocess(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("fit", "predict", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["fit", "predict", "demo"])
def test_help_each_command(command, capsys):
    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: gpderiv {command}")


def test_usage_error_exit_code(capsys):
    assert main(["fit", "data.csv", "--x", "x1", "--y", "f", "--kernel", "nope", "--save", "m.pt"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["fit", "data.csv", "--x", "x1,x2", "--y", "f", "--grad", "g1", "--save", "m.pt"]) == 2
    assert "--grad names 1 columns, --x names 2" in capsys.readouterr().err


def test_fit_summary_and_sidecar(fitted):
    d, model, observed, stdout = fitted
    assert model.is_file() and Path(str(model) + ".json").is_file()
    line = stdout.strip()
    assert "\n" not in line
    assert f"n=15 d=2 N={observed} observed" in line and "log ML" in line and " s " in line
    assert not [p for p in os.listdir(d) if p.endswith(".tmp")]


def test_predict_round_trip(fitted, tmp_path, capsys):
    _, model, _, _ = fitted
    pts = np.array([[0.5, 0.5], [0.3, 0.6], [0.6, 0.35], [0.45, 0.7]])
    with open(tmp_path / "pts.csv", "w") as fh:  # other column order and an extra column
        fh.write("id,x2,x1\n" + "".join(f"p{i},{float(b)!r},{float(a)!r}\n" for i, (a, b) in enumerate(pts)))
    out = tmp_path / "pred.csv"
    assert main(["predict", str(model), str(tmp_path / "pts.csv"), "--out", str(out), "--grad", "--std"]) == 0
    assert "4 points" in capsys.readouterr().out
    cols, values = read_output(out)
    assert cols == ["x1", "x2", "mean", "std", "grad_x1", "grad_x1_std", "grad_x2", "grad_x2_std"]
    np.testing.assert_allclose(values[:, :2], pts)
    f, g = truth(pts)
    np.testing.assert_allclose(values[:, 2], f, atol=0.02)
    np.testing.assert_allclose(values[:, [4, 6]], g, atol=0.2)
    assert (values[:, [3, 5, 7]] > 0).all() and np.isfinite(values).all()


def test_predict_local_std(fitted, tmp_path):
    """--local K: standard deviations from the K nearest points, above the exact ones; all points: exact."""
    _, model, _, _ = fitted
    (tmp_path / "pts.csv").write_text("x1,x2\n0.5,0.5\n0.2,0.8\n")
    outputs = {}
    for name, extra in (("exact", ["--std"]), ("local", ["--local", "3"]), ("all", ["--local", "15"])):
        out = tmp_path / f"{name}.csv"
        assert main(["predict", str(model), str(tmp_path / "pts.csv"), "--out", str(out), "--grad", *extra]) == 0
        cols, outputs[name] = read_output(out)
        assert cols == ["x1", "x2", "mean", "std", "grad_x1", "grad_x1_std", "grad_x2", "grad_x2_std"]
    std = [3, 5, 7]
    np.testing.assert_allclose(outputs["local"][:, :3], outputs["exact"][:, :3])  # same means
    assert (outputs["local"][:, std] > outputs["exact"][:, std]).all()
    np.testing.assert_allclose(outputs["all"][:, std], outputs["exact"][:, std], rtol=1e-8)


def test_predict_mean_only_and_x_override(fitted, tmp_path):
    _, model, _, _ = fitted
    (tmp_path / "pts.csv").write_text("a,b\n0.5,0.5\n0.2,0.8\n")
    out = tmp_path / "pred.csv"
    assert main(["predict", str(model), str(tmp_path / "pts.csv"), "--out", str(out), "--x", "a,b"]) == 0
    cols, values = read_output(out)
    assert cols == ["a", "b", "mean"] and values.shape == (2, 3)
    # without --x the names come from the sidecar (x1, x2), which this file lacks
    assert main(["predict", str(model), str(tmp_path / "pts.csv"), "--out", str(tmp_path / "p2.csv")]) == 2
    assert not (tmp_path / "p2.csv").exists()


def test_demo_smoke(tmp_path, capsys):
    assert main(["demo", "--smoke", "--out", str(tmp_path / "demo")]) == 0
    png = tmp_path / "demo" / "gpderiv_demo.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "with grad" in out and "values only" in out and "RMSE f" in out


# ----------------------------------------------------------------------------- errors
FIT_ERRORS = {
    # name: (file content or None for a missing file, expected "<location>: <what>" after the file name)
    "missing": (None, ": no such file"),
    "empty": ("", ", row 1: empty file"),
    "header_only": (HEADER, ", row 2: no data rows"),
    "missing_column": ("x1,x2,f,df_dx1\n1,2,3,4\n", ", row 1, column df_dx2: no such column"),
    "non_numeric_x": (HEADER + "0.1,0.2,1,2,3\nabc,0.3,1,2,3\n", ", row 3, column x1: not a number: 'abc'"),
    "non_numeric_y": (HEADER + "0.1,0.2,1,2,3\n0.2,0.3,1.2.3,2,3\n", ", row 3, column f: not a number"),
    "empty_x": (HEADER + "0.1,,1,2,3\n", ", row 2, column x2: empty cell"),
    "nan_x": (HEADER + "nan,0.1,1,2,3\n", ", row 2, column x1: not a finite number"),
    "inf_grad": (HEADER + "0.1,0.1,1,inf,3\n", ", row 2, column df_dx1: not a finite number"),
    "too_few_fields": (HEADER + "0.1,0.2,1,2,3\n0.2,0.3,1\n", ", row 3, column df_dx1: missing field"),
    "too_many_fields": (HEADER + "0.1,0.2,1,2,3\n0.2,0.3,1,2,3,4\n", ", row 3: 6 fields, the header has 5"),
    "malformed": (HEADER + '0.1,0.2,"1,2,3\n', ", row 2: malformed CSV"),
    "duplicate_header": ("x1,x2,f,df_dx1,df_dx1\n1,2,3,4,5\n", ", row 1, column df_dx1: duplicate column name"),
    "blank_line_counted": (HEADER + "0.1,0.2,1,2,3\n\n0.2,x,1,2,3\n", ", row 4, column x2: not a number"),
}


def assert_one_line_error(err: str, expected_prefix: str) -> None:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("gpderiv: error: " + expected_prefix), err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", sorted(FIT_ERRORS))
def test_fit_file_errors(case, tmp_path, capsys):
    content, where = FIT_ERRORS[case]
    data = tmp_path / "data.csv"
    if content is not None:
        data.write_text(content)
    model = tmp_path / "model.pt"
    assert main(["fit", str(data), *FIT_ARGS, "--save", str(model)]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, f"{data}{where}")
    assert captured.out == ""
    assert sorted(os.listdir(tmp_path)) == ([] if content is None else ["data.csv"])


def test_fit_model_error_is_one_line(tmp_path, capsys):
    (tmp_path / "data.csv").write_text("x1,f\n0.1,\n0.2,nan\n")
    assert main(["fit", str(tmp_path / "data.csv"), "--x", "x1", "--y", "f", "--save", str(tmp_path / "m.pt")]) == 2
    assert_one_line_error(capsys.readouterr().err, f"{tmp_path / 'data.csv'}: y, grad: expected at least one")
    assert os.listdir(tmp_path) == ["data.csv"]


def _predict_error(tmp_path, capsys, model: Path, points: str, *extra: str) -> str:
    (tmp_path / "pts.csv").write_text(points)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(model), str(tmp_path / "pts.csv"), "--out", str(out), *extra]) == 2
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    return capsys.readouterr().err


def test_predict_errors(fitted, tmp_path, capsys):
    _, model, _, _ = fitted
    pts = tmp_path / "pts.csv"
    err = _predict_error(tmp_path, capsys, model, "x1\n0.5\n")
    assert_one_line_error(err, f"{pts}, row 1, column x2: no such column")
    err = _predict_error(tmp_path, capsys, model, "x1,x2\n0.5,0.5\n0.5,oops\n")
    assert_one_line_error(err, f"{pts}, row 3, column x2: not a number: 'oops'")
    err = _predict_error(tmp_path, capsys, model, "x1,x2\n0.5,0.5,0.1\n")
    assert_one_line_error(err, f"{pts}, row 2: 3 fields, the header has 2")
    err = _predict_error(tmp_path, capsys, model, "x1,x2\n")
    assert_one_line_error(err, f"{pts}, row 2: no data rows")
    err = _predict_error(tmp_path, capsys, tmp_path / "nothere.pt", "x1,x2\n0.5,0.5\n")
    assert_one_line_error(err, f"{tmp_path / 'nothere.pt'}: no such file")
    err = _predict_error(tmp_path, capsys, model, "x1,x2\n0.5,0.5\n", "--x", "x1")
    assert_one_line_error(err, f"{model}: the model has d=2 inputs, got 1 x columns")


def test_predict_corrupt_model_and_sidecar(fitted, tmp_path, capsys):
    _, model, _, _ = fitted
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    err = _predict_error(tmp_path, capsys, bad, "x1,x2\n0.5,0.5\n")
    assert_one_line_error(err, f"{bad}: not a readable gpderiv model file")
    copy = tmp_path / "copy.pt"
    copy.write_bytes(model.read_bytes())
    err = _predict_error(tmp_path, capsys, copy, "x1,x2\n0.5,0.5\n")  # no sidecar, no --x
    assert_one_line_error(err, f"{copy}: no column names")
    Path(str(copy) + ".json").write_text("{not json")
    err = _predict_error(tmp_path, capsys, copy, "x1,x2\n0.5,0.5\n")
    assert_one_line_error(err, f"{copy}.json: unreadable column-name file")


def test_error_subprocess(tmp_path):
    (tmp_path / "data.csv").write_text(HEADER + "0.1,0.2,1,2,3\n0.2,0.3,1,2\n")
    result = run_cli("fit", "data.csv", *FIT_ARGS, "--save", "model.pt", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert (
        result.stderr == "gpderiv: error: data.csv, row 3, column df_dx2: missing field: 4 fields, the header has 5\n"
    )
    assert os.listdir(tmp_path) == ["data.csv"]


def test_pending_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.csv"

    def half_write(path: str) -> None:
        with open(path, "w") as fh:
            fh.write("x1,mean\n0.1,")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        _PendingFile(str(target), half_write)
    assert os.listdir(tmp_path) == []
    with pytest.raises(CLIError, match=re.escape(f"{tmp_path / 'no' / 'out.csv'}: cannot write")):
        _PendingFile(str(tmp_path / "no" / "out.csv"), half_write)
    pending = _PendingFile(str(target), lambda p: Path(p).write_text("ok\n"))
    assert not target.exists()
    pending.commit()
    assert target.read_text() == "ok\n" and os.listdir(tmp_path) == ["out.csv"]


def test_error_message_is_one_line():
    assert str(CLIError("m.pt", "bad file (RuntimeError:\n\tMissing keys)", row=3)) == (
        "m.pt, row 3: bad file (RuntimeError: Missing keys)"
    )


def test_cli_output_files_honour_the_umask(tmp_path):
    """Model, column-name and prediction files get ``0o666`` less the umask (not the temporary file's 0o600)."""
    write_training_csv(tmp_path / "data.csv")
    (tmp_path / "pts.csv").write_text("x1,x2\n0.1,0.2\n0.3,0.4\n")
    old = os.umask(0o027)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["fit", str(tmp_path / "data.csv"), *FIT_ARGS, "--save", str(tmp_path / "m.pt")]) == 0
            predict = ["predict", str(tmp_path / "m.pt"), str(tmp_path / "pts.csv"), "--out", str(tmp_path / "o.csv")]
            assert main(predict) == 0
    finally:
        os.umask(old)
    for name in ("m.pt", "m.pt.json", "o.csv"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640, name


def test_predict_to_standard_output(fitted, tmp_path):
    """``--out -``: the CSV on stdout and nothing else there (the summary goes to stderr), same numbers as a file."""
    _, model, _, _ = fitted
    with open(tmp_path / "pts.csv", "w") as fh:
        fh.write("x1,x2\n0.5,0.5\n0.3,0.6\n0.6,0.35\n")
    result = run_cli("predict", str(model), "pts.csv", "--out", "-", "--grad", "--std", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 points -> standard output" in result.stderr
    to_file = ["predict", str(model), str(tmp_path / "pts.csv"), "--out", str(tmp_path / "p.csv"), "--grad", "--std"]
    assert main(to_file) == 0
    assert result.stdout == (tmp_path / "p.csv").read_text()  # the whole of stdout is the CSV
    assert not [p for p in os.listdir(tmp_path) if p not in ("pts.csv", "p.csv")]  # no file named "-"


def test_version_does_not_import_torch(tmp_path):
    """``python -m gpderiv --version`` and the ``gpderiv`` script's entry point print the version without torch."""
    import configparser

    import gpderiv

    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == f"gpderiv {gpderiv.__version__}\n"
    # -X importtime lists every module imported on stderr: python -m gpderiv --version imports no torch.
    timed = [sys.executable, "-X", "importtime", "-m", "gpderiv", "--version"]
    imports = subprocess.run(timed, cwd=tmp_path, capture_output=True, text=True, timeout=60).stderr
    assert re.search(r"\|\s*gpderiv$", imports, re.M) and not re.search(r"\|\s*torch\b", imports)
    config = configparser.ConfigParser()
    config.read(Path(gpderiv.__file__).parent.parent / "setup.cfg")
    target = config["options.entry_points"]["console_scripts"].split("=")[1].strip()
    module, function = target.split(":")
    probe = (
        f"import sys; from {module} import {function} as main; code = main(['--version']); "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m); sys.exit(code)"
    )
    script = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert script.returncode == 0, script.stderr
    assert script.stdout == f"gpderiv {gpderiv.__version__}\n"


def test_package_imports_lazily_but_completely(tmp_path):
    """``import gpderiv`` imports no torch; every public name and the submodules are still there on access."""
    probe = (
        "import sys, gpderiv; assert 'torch' not in sys.modules; "
        "from gpderiv import *; assert DerivativeGP.__name__ == 'DerivativeGP' and issubclass(InputWarning, Warning); "
        "assert gpderiv.model.DerivativeGP is DerivativeGP and gpderiv.kernels.__name__ == 'gpderiv.kernels'; "
        "assert sorted(gpderiv.__all__) == sorted(n for n in gpderiv.__all__ if hasattr(gpderiv, n)); "
        "assert not hasattr(gpderiv, 'no_such_name')"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_predict_to_a_pipe_closed_early_ends_quietly(fitted, tmp_path):
    """``gpderiv predict ... --out - | head -1``: the reader leaves; no traceback, exit code 0 (found in review)."""
    _, model, _, _ = fitted
    rows = "\n".join(f"{i / 4000:.6f},{1 - i / 4000:.6f}" for i in range(4000))
    (tmp_path / "pts.csv").write_text("x1,x2\n" + rows + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpderiv", "predict", str(model), str(tmp_path / "pts.csv"), "--out", "-", "--std"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    assert proc.stdout.readline().startswith(b"x1,x2,mean")
    proc.stdout.close()  # more than a pipe buffer is still to come
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr
