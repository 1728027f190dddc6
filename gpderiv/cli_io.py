"""The command line's files: CSV tables in, model and result files out, and their checks.

Errors in the user's files are :class:`CLIError`: ``<file>, row <r>, column <name>: <what>``.
Rows are the lines of the CSV file: the header is row 1, the first data row is row 2.

Numbers in CSV cells are plain decimal or scientific notation (``12``, ``-0.5``, ``1.5e-3``,
``.5``, ``3.``), with spaces or tabs around them; ``nan`` (any case) or an empty cell means "not
observed" in y and grad columns. Other spellings that Python's ``float()`` would accept
(``1_000``, full-width or other non-ASCII digits, non-breaking spaces) are refused with the row and
column, because a CSV reader that accepts them reads data that other tools read differently.

Output paths are checked before anything is read or written (:func:`check_outputs`): an output
that is one of the inputs (under any spelling: relative or absolute, ``./``, a symbolic or hard
link), a directory, or a file in a directory that does not exist is refused. Outputs are written to
a temporary file in the target directory and renamed (:class:`~gpderiv.persistence.PendingFile`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from gpderiv.persistence import PendingFile

__all__ = ["CLIError", "Table", "check_outputs", "read_csv"]

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


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")
