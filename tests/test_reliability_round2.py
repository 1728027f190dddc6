"""Reliability catalogue, round 2: the command line's output files, argument checks, predict before fit.

Each test is one case of docs/reliability.md, section "Round 2: command line and validation"
(cases 63-81; the table gives the entry point, the expected behaviour and the test name). As in
tests/test_reliability.py, whose helpers this module uses, every case ends in a typed error naming
the argument (or the option and path, or the file, row and column) or in a documented behaviour:
never a replaced input file, a leftover temporary file, a traceback or a silent NaN.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_reliability import FIT_ARGS, HEADER, assert_cli_error, data, no_leftovers, run_cli, training_csv

import gpderiv
from gpderiv import DerivativeGP, NotFittedWarning
from gpderiv.testing import contains_all

MAXITER = 3


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding ``data.csv`` (n = 8, d = 2), also the current directory."""
    training_csv(tmp_path / "data.csv")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fit_cli(save: str, data_file: str = "data.csv") -> tuple[int, str, str]:
    """``gpderiv fit`` with a short ``--maxiter``; its OptimizationWarning line is dropped from stderr."""
    code, out, err = run_cli("fit", data_file, *FIT_ARGS, "--save", save)
    err = "".join(line for line in err.splitlines(keepends=True) if "L-BFGS-B stopped at maxiter" not in line)
    return code, out, err


@pytest.fixture
def fitted_dir(workdir: Path) -> Path:
    """``workdir`` with ``model.pt`` and ``model.pt.json`` written by ``gpderiv fit``."""
    code, _, err = fit_cli("model.pt")
    assert code == 0, err
    return workdir


def snapshot(directory: Path) -> dict[str, bytes]:
    """The name and content of every file in ``directory``."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and not p.is_symlink()}


# ----------------------------------------------------------------------------------------------
# Category 1: output paths of the command line (cases 63-69)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["data.csv", "./data.csv", "sub/../data.csv", "ABSOLUTE"])
def test_cli_fit_save_onto_the_data_file_is_refused(workdir, spelling):
    """Case 63: ``--save`` naming the input CSV, however spelled, is refused before fitting."""
    (workdir / "sub").mkdir()
    save = str(workdir / "data.csv") if spelling == "ABSOLUTE" else spelling
    before = snapshot(workdir)
    assert_cli_error(fit_cli(save), f"--save {save}: ", "is the input data file data.csv", "choose another")
    assert snapshot(workdir) == before
    no_leftovers(workdir, "data.csv", "sub")


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_cli_fit_save_onto_a_link_to_the_data_file_is_refused(workdir, link):
    """Case 64: ``--save`` naming a symbolic or hard link to the input CSV is refused."""
    (os.symlink if link == "symlink" else os.link)("data.csv", "alias.csv")
    before = snapshot(workdir)
    assert_cli_error(fit_cli("alias.csv"), "--save alias.csv: is the input data file data.csv")
    assert snapshot(workdir) == before
    assert (workdir / "alias.csv").is_symlink() == (link == "symlink")
    no_leftovers(workdir, "data.csv", "alias.csv")


def test_cli_fit_column_name_file_onto_the_data_file_is_refused(workdir):
    """Case 65: ``fit m.pt.json --save m.pt`` would write the column names over the data: refused."""
    os.rename("data.csv", "m.pt.json")
    before = snapshot(workdir)
    assert_cli_error(fit_cli("m.pt", "m.pt.json"), "--save's column-name file m.pt.json: is the input data file")
    assert snapshot(workdir) == before
    no_leftovers(workdir, "m.pt.json")


@pytest.mark.parametrize(
    ("out", "what"),
    [
        ("model.pt", "is the model file model.pt"),
        ("./model.pt", "is the model file model.pt"),
        ("model.pt.json", "is the model's column-name file model.pt.json"),
        ("data.csv", "is the points file data.csv"),
        ("sub/../data.csv", "is the points file data.csv"),
        ("link.csv", "is the points file data.csv"),
    ],
)
def test_cli_predict_out_onto_an_input_is_refused(fitted_dir, out, what):
    """Case 66: ``predict --out`` naming the model, its column-name file or the points (or a link) is refused."""
    (fitted_dir / "sub").mkdir()
    os.symlink("data.csv", "link.csv")
    before = snapshot(fitted_dir)
    assert_cli_error(run_cli("predict", "model.pt", "data.csv", "--out", out), f"--out {out}: {what}")
    assert snapshot(fitted_dir) == before
    no_leftovers(fitted_dir, "data.csv", "model.pt", "model.pt.json", "sub", "link.csv")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "data.csv", *FIT_ARGS, "--save", "out"], "--save out: is a directory"),
        (["fit", "data.csv", *FIT_ARGS, "--save", "new.pt/"], "--save new.pt/: is a directory"),
        (["fit", "data.csv", *FIT_ARGS, "--save", "m"], "--save's column-name file m.json: is a directory"),
        (["predict", "model.pt", "data.csv", "--out", "out"], "--out out: is a directory"),
        (["predict", "model.pt", "data.csv", "--out", "out/"], "--out out/: is a directory"),
    ],
)
def test_cli_output_that_is_a_directory_is_refused(fitted_dir, argv, message):
    """Case 67: an output path that is a directory: exit 2, one line, no temporary file anywhere."""
    (fitted_dir / "out").mkdir()
    (fitted_dir / "m.json").mkdir()
    assert_cli_error(run_cli(*argv), message, "expected the path of a file")
    no_leftovers(fitted_dir, "data.csv", "model.pt", "model.pt.json", "out", "m.json")
    assert os.listdir(fitted_dir / "out") == [] and os.listdir(fitted_dir / "m.json") == []


@pytest.mark.parametrize("command", ["fit", "predict"])
def test_cli_output_in_a_missing_directory_is_refused(fitted_dir, command):
    """Case 68: an output in a directory that does not exist is refused before any work."""
    argv = (
        ["fit", "data.csv", *FIT_ARGS, "--save", "nodir/m.pt"]
        if command == "fit"
        else ["predict", "model.pt", "data.csv", "--out", "nodir/p.csv"]
    )
    option = "--save" if command == "fit" else "--out"
    assert_cli_error(run_cli(*argv), f"{option} nodir/", "nodir does not exist")
    no_leftovers(fitted_dir, "data.csv", "model.pt", "model.pt.json")


def test_cli_failed_rename_leaves_no_temporary_file(workdir, monkeypatch):
    """Case 69: the second rename of ``fit`` (the column-name file) fails: exit 2, no temporary file left."""
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith(".json"):
            raise PermissionError(13, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert_cli_error(fit_cli("m.pt"), "m.pt.json: cannot write (Permission denied)")
    assert [f for f in os.listdir(workdir) if f.endswith(".tmp")] == []


# ----------------------------------------------------------------------------------------------
# Category 6: validation gaps (cases 70-78)
# ----------------------------------------------------------------------------------------------


def test_infinite_directional_values_are_refused():
    """Case 70: Inf in directional-derivative values is not "missing" (NaN is): ValueError, never a NaN fit."""
    X, y, g = data(5, 2)
    V = [[1.0, 0.0], [0.0, 1.0]]
    for bad in (math.inf, -math.inf):
        with pytest.raises(ValueError, match=contains_all("directional values", "expected finite numbers or NaN")):
            DerivativeGP(X, y, g, directional=([0, 1], V, [bad, 1.0]))
    model = DerivativeGP(X, y, g, directional=([0, 1], V, [math.nan, 1.0]))  # NaN: not observed
    assert model.num_observations == 5 * 3 + 1


@pytest.mark.parametrize(
    ("seed", "error"),
    [(2**64, ValueError), (-(2**63) - 1, ValueError), (1.5, TypeError), (True, TypeError), ("1", TypeError)],
)
def test_fit_seed_is_checked(seed, error):
    """Case 71: a seed torch cannot use, a float, a bool or a string: typed error naming ``seed``."""
    X, y, g = data(5, 2)
    with pytest.raises(error, match=contains_all("seed: expected an integer in [-2**63, 2**64)", "got")):
        DerivativeGP(X, y, g).fit(maxiter=1, restarts=1, seed=seed)


def test_fit_seed_accepts_the_whole_range_and_numpy_integers():
    """Case 71 (neighbour): the largest seed and numpy integers are seeds."""
    X, y, g = data(5, 2)
    for seed in (2**64 - 1, -(2**63), np.int64(7)):
        assert DerivativeGP(X, y, g).fit(maxiter=1, restarts=1, seed=seed).fitted


def test_cli_seed_out_of_range(workdir):
    """Case 72: ``gpderiv fit --seed`` beyond torch's range: a usage error (exit 2), no traceback, no file."""
    code, out, err = run_cli("fit", "data.csv", *FIT_ARGS, "--save", "m.pt", "--seed", str(2**70))
    assert code == 2 and out == "" and "Traceback" not in err
    assert "argument --seed: expected an integer in [-2**63, 2**64)" in err
    no_leftovers(workdir, "data.csv")


@pytest.fixture(scope="module")
def fitted_model() -> DerivativeGP:
    X, y, g = data(6, 2)
    return DerivativeGP(X, y, g).fit(maxiter=MAXITER)


@pytest.mark.parametrize("method", ["predict", "predict_hessian", "predict_directional", "laplacian"])
@pytest.mark.parametrize(
    ("chunk_size", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)]
)
def test_chunk_size_is_checked(fitted_model, method, chunk_size, error):
    """Case 73: ``chunk_size`` zero, negative, fractional, bool or a string: typed error naming it."""
    Xs = data(3, 2, seed=1)[0]
    args = (Xs, Xs) if method == "predict_directional" else (Xs,)
    with pytest.raises(error, match=contains_all("chunk_size: expected a positive integer, got")):
        getattr(fitted_model, method)(*args, chunk_size=chunk_size)
    result = getattr(fitted_model, method)(*args, chunk_size=np.int64(2))
    assert torch.isfinite(result.mean if method == "predict" else result[0]).all()


@pytest.mark.parametrize("argument", ["noise", "grad_noise"])
@pytest.mark.parametrize(
    "value", [True, False, np.bool_(True), [True, False], torch.tensor(True), np.array([True, True]), "0.1"]
)
def test_boolean_or_string_noise_is_refused(argument, value):
    """Case 74: ``noise=True`` is not a variance of 1 (nor ``False`` known zero noise): TypeError."""
    X, y, g = data(5, 2)
    with pytest.raises(TypeError, match=contains_all(f"{argument}: expected a number", "(a variance), got")):
        DerivativeGP(X, y, g, **{argument: value})


@pytest.mark.parametrize(
    ("where", "kwargs"),
    [
        ("init", {"shared_grad_noise": "no"}),
        ("init", {"shared_grad_noise": 1}),
        ("init", {"noise_lower_bound": True}),
        ("fit", {"lr": True, "optimizer": "adam"}),
        ("fit", {"lr": "0.1", "optimizer": "adam"}),
        ("fit", {"progress": "no"}),
        ("fit", {"maxiter": True}),
        ("fit", {"restarts": 1.0}),
        ("predict", {"full_cov": "no"}),
        ("predict", {"observation_noise": "no"}),
        ("predict", {"hessian": 1}),
        ("predict", {"variance": 1}),
    ],
)
def test_flags_and_numbers_of_the_wrong_type_are_refused(fitted_model, where, kwargs):
    """Case 75: yes/no arguments given a string or a number, numbers given a bool or a string: typed error."""
    X, y, g = data(5, 2)
    argument = next(k for k in kwargs if k != "optimizer")
    with pytest.raises((TypeError, ValueError), match=contains_all(f"{argument}: expected", "got")):
        if where == "init":
            DerivativeGP(X, y, g, **kwargs)
        elif where == "fit":
            DerivativeGP(X, y, g).fit(**{"maxiter": 1, **kwargs})
        else:
            fitted_model.predict(X, **kwargs)


def test_numpy_integers_and_bools_are_accepted():
    """Case 75 (neighbour): numpy integers are counts and numpy bools are flags."""
    X, y, g = data(5, 2)
    model = DerivativeGP(X, y, g, shared_grad_noise=np.bool_(True)).fit(maxiter=np.int64(2), restarts=np.int32(0))
    pred = model.predict(X, full_cov=np.bool_(False), chunk_size=np.int64(2))
    assert torch.isfinite(pred.mean).all()


def test_save_into_a_missing_directory_or_onto_a_directory(fitted_model, tmp_path):
    """Case 76: ``save`` into a missing directory or onto one: a typed error naming ``path``; nothing written."""
    target = tmp_path / "nodir" / "m.pt"
    with pytest.raises(
        FileNotFoundError, match=contains_all("path: expected a file in an existing directory", "nodir")
    ):
        fitted_model.save(target)
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError, match=contains_all("path: expected a file, got the directory", "adir")):
        fitted_model.save(tmp_path / "adir")
    assert sorted(os.listdir(tmp_path)) == ["adir"] and os.listdir(tmp_path / "adir") == []


@pytest.mark.parametrize(
    ("key", "where"),
    [
        ("covar_module.base_kernel.raw_lengthscale_constraint.lower_bound", "state_dict"),
        ("likelihood.raw_value_noise_constraint.lower_bound", "state_dict"),
        ("mll", "payload"),
        ("mll_history", "payload"),
    ],
)
def test_tampered_model_file_with_nan_is_refused_naming_the_file(fitted_model, tmp_path, key, where):
    """Case 77: NaN where a loaded file was only checked for Inf (constraint bounds) or not at all (mll)."""
    path = tmp_path / "m.pt"
    fitted_model.save(path)
    payload = torch.load(path, weights_only=True)
    if where == "state_dict":
        payload["state_dict"][key] = torch.full_like(payload["state_dict"][key], math.nan)
    else:
        payload[key] = [math.nan] if key == "mll_history" else math.nan
    torch.save(payload, path)
    with pytest.raises(ValueError, match=contains_all(str(path), "corrupt gpderiv model file", f"in {key}")):
        DerivativeGP.load(path)
    Xs = tmp_path / "pts.csv"
    Xs.write_text("x1,x2\n0.5,0.5\n")
    assert_cli_error(
        run_cli("predict", str(path), str(Xs), "--x", "x1,x2", "--out", str(tmp_path / "p.csv")), str(path)
    )
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    "cell", ["1_000", "\uff11\uff12", "\u0661\u0662", "1.5\u00a0", "\u00a01.5", "1.5\u2009", "\U0001d7d9", "0x10"]
)
def test_cli_numbers_that_float_accepts_but_csv_should_not(workdir, cell):
    """Case 78: cells ``float()`` reads but a CSV reader should not (digit separators, non-ASCII digits and spaces)."""
    rows = (workdir / "data.csv").read_text().splitlines()
    fields = rows[3].split(",")
    fields[1] = cell
    rows[3] = ",".join(fields)
    (workdir / "data.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert_cli_error(
        fit_cli("m.pt"), "data.csv, row 4, column x2: not a number: ", "(expected plain decimal or scientific notation"
    )
    no_leftovers(workdir, "data.csv")


def test_cli_plain_numbers_are_accepted(workdir):
    """Case 78 (neighbour): what the reader accepts: decimal and scientific notation, spaces, nan and empty cells."""
    X, y, g = data(6, 2)
    spellings = ["{:.6f}", " {:.6e} ", "+{:.6f}", "{:.6E}", "\t{:.6f}", "{:.6f}"]
    lines = [
        ",".join([spellings[i].format(float(X[i, 0])), f"{float(X[i, 1]):.4f}", repr(float(y[i])), *g_cells])
        for i, g_cells in enumerate([["", "NaN"], ["nan", ""], ["1.", ".5"], ["-2", "3e-1"], ["0", "0"], ["1", "1"]])
    ]
    (workdir / "data.csv").write_text(HEADER + "\n".join(lines) + "\n")
    code, out, err = fit_cli("m.pt")
    assert code == 0 and err == "" and "N=14 observed" in out, (out, err)


# ----------------------------------------------------------------------------------------------
# Category 8: predict before fit (cases 79-81)
# ----------------------------------------------------------------------------------------------


def test_predict_before_fit_warns_once():
    """Case 79: the first prediction of a never-fitted model warns once, naming the fix; later ones do not."""
    X, y, g = data(5, 2)
    model = DerivativeGP(X, y, g)
    assert issubclass(NotFittedWarning, UserWarning) and gpderiv.NotFittedWarning is NotFittedWarning
    with pytest.warns(NotFittedWarning, match=contains_all("never fitted", "model.fit()", "model.fitted = True")):
        model.predict(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict(X)
        model.predict_hessian(X)
        model.laplacian(X)
        model.posterior(X[:2])


@pytest.mark.parametrize("method", ["predict_hessian", "predict_directional", "laplacian", "posterior"])
def test_every_prediction_method_warns_before_fit(method):
    """Case 79 (neighbour): every prediction method warns at the first prediction of a never-fitted model."""
    X, y, g = data(5, 2)
    args = (X, X) if method == "predict_directional" else (X,)
    with pytest.warns(NotFittedWarning):
        getattr(DerivativeGP(X, y, g), method)(*args)


def test_no_not_fitted_warning_after_fit_or_fitted_flag():
    """Case 80: no warning after ``fit()`` or after ``model.fitted = True`` (hyperparameters set by hand)."""
    X, y, g = data(5, 2)
    by_hand = DerivativeGP(X, y, g, noise=1e-4, grad_noise=1e-4)
    by_hand.covar_module.base_kernel.lengthscale = 0.5
    by_hand.fitted = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotFittedWarning)
        DerivativeGP(X, y, g).fit(maxiter=1).predict(X)
        by_hand.predict(X)


@pytest.mark.parametrize("fit", [True, False])
def test_loaded_model_warns_only_if_it_was_saved_unfitted(tmp_path, fit):
    """Case 81: ``fitted`` is saved: a model saved after ``fit()`` loads fitted, one saved before does not."""
    X, y, g = data(5, 2)
    model = DerivativeGP(X, y, g)
    if fit:
        model.fit(maxiter=1)
    model.save(tmp_path / "m.pt")
    loaded = DerivativeGP.load(tmp_path / "m.pt")
    assert loaded.fitted is fit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded.predict(X)
    assert [w.category for w in caught] == ([] if fit else [NotFittedWarning])


def test_model_file_without_the_fitted_entry_is_fitted_if_it_has_an_mll(fitted_model, tmp_path):
    """Case 81 (neighbour): files written before the ``fitted`` entry: fitted when they hold an mll."""
    path = tmp_path / "m.pt"
    fitted_model.save(path)
    payload = torch.load(path, weights_only=True)
    del payload["fitted"]
    torch.save(payload, path)
    assert DerivativeGP.load(path).fitted is True
    payload["mll"] = None
    torch.save(payload, path)
    assert DerivativeGP.load(path).fitted is False
    payload["fitted"] = "yes"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=contains_all(str(path), "corrupt", "fitted")):
        DerivativeGP.load(path)
