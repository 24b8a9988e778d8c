"""The end user's plaintext files, in and out (`cipherpool query encrypt | predict | decrypt`).

In: ``.npy``, or text: CSV with ``,`` or ``;`` between cells (sniffed; with ``;``, a decimal
comma is read too), or tabs and spaces. A first row that is not all numbers is a header, skipped
(and said). Empty files, empty or NaN cells and rows of uneven length are refused with one
line each, naming the row as a spreadsheet numbers it; the column count is checked against
the model's input shape (from the gateway's description of the model, read from its client
specs) before concrete is loaded.

Out: the format that ``--output``'s extension says: ``.csv``, ``.npy`` or ``.json``, 0600.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cipherpool.errors import InvalidInput
from cipherpool.files import FILE_MODE

if TYPE_CHECKING:  # numpy is imported by the functions that read or write numbers, not by `--help`
    from numpy.typing import NDArray

MAX_PROBLEMS = 5  # lines of problems shown; the rest are counted
OUTPUT_FORMATS = {".csv": "CSV", ".npy": "NumPy", ".json": "JSON"}


@dataclass
class Rows:
    """Numbers read from a file, one sample per row (``file_rows``: each row's line number)."""

    path: Path
    values: NDArray[Any]
    file_rows: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was done to read it (a header skipped)
    text: bool = True  # from a text file (else .npy: one array as saved)

    def for_model(self, name: str, version: int, input_shape: Sequence[int] | None) -> NDArray[Any]:
        """The samples as the model takes them, after checking each row's length against its
        input shape (with the batch axis, e.g. [1, 64] or [1, 1, 8, 8]); one line per problem."""
        if not self.text:
            return self.values
        if not input_shape:  # a model whose specs did not say: one row is one sample
            return self.values[0] if len(self.values) == 1 else self.values
        sample = [int(d) for d in input_shape[1:]] or [int(input_shape[0])]
        features = math.prod(sample)
        columns = self.values.shape[1]
        if columns != features:
            others = len(self.file_rows) - 1
            also = f" (as has every other row, {others} more)" if others else ""
            raise _problems(
                self.path, [f"row {self.file_rows[0]} has {columns} columns{also}; model {name} v{version} takes {features}"]
            )
        rows = self.values.reshape(len(self.values), *sample) if len(sample) > 1 else self.values
        return rows[0] if len(rows) == 1 else rows


def read_rows(path: Path) -> Rows:
    """Read a plaintext input file (see the module's doc); InvalidInput says what is wrong."""
    import numpy as np

    if path.suffix.lower() == ".npy":
        try:
            array: NDArray[Any] = np.load(path, allow_pickle=False)  # a .npy file holds one array
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"Cannot read {path} as a NumPy file: {exc}") from None
        if array.size == 0:
            raise InvalidInput(f"{path} is empty: no sample to query.")
        if np.issubdtype(array.dtype, np.number) and not np.isfinite(array).all():
            raise InvalidInput(f"{path} holds NaN or infinite values; the model takes finite numbers.")
        return Rows(path, array, text=False)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's CSV may start with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"Cannot read {path}: {exc}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise InvalidInput(f"{path} is empty: no rows to query.")
    separator = _sniff([line for _, line in lines[:20]])
    decimal_comma = separator == ";" and not any("." in line for _, line in lines[:20])
    rows = [(n, _cells(line, separator)) for n, line in lines]
    notes = []
    if _is_header(rows[0][1], decimal_comma):
        header = rows.pop(0)[1]
        shown = ", ".join(header[:6]) + (", …" if len(header) > 6 else "")
        notes.append(f"skipped the header row of {path.name} ({shown})")
        if not rows:
            raise InvalidInput(f"{path} has a header row ({shown}) and no rows of numbers under it.")
    width = len(rows[0][1])
    problems: list[str] = []
    values: list[list[float]] = []
    for n, cells in rows:
        if len(cells) != width:
            problems.append(f"row {n} has {len(cells)} columns; row {rows[0][0]} has {width}")
            continue
        row: list[float] = []
        for column, cell in enumerate(cells, start=1):
            number = _number(cell, decimal_comma)
            if cell == "":
                problems.append(f"row {n}, column {column} is empty")
            elif number is None:
                problems.append(f"row {n}, column {column} is not a number: {cell[:40]!r}")
            elif math.isnan(number):
                problems.append(f"row {n}, column {column} is NaN")
            elif math.isinf(number):
                problems.append(f"row {n}, column {column} is infinite")
            else:
                row.append(number)
        values.append(row)
    if problems:
        raise _problems(path, problems)
    return Rows(path, np.array(values, dtype=np.float64), [n for n, _ in rows], notes)


def _sniff(lines: list[str]) -> str | None:
    """The cell separator: ``;`` or ``,`` if the lines have one (in that order: a ``;`` file
    may use decimal commas), else None (white space: spaces or tabs)."""
    for separator in (";", ","):
        if any(separator in line for line in lines):
            return separator
    return None


def _cells(line: str, separator: str | None) -> list[str]:
    if separator is None:
        return line.split()
    return [cell.strip() for cell in next(csv.reader([line], delimiter=separator))]


def _is_header(cells: list[str], decimal_comma: bool) -> bool:
    """A first row of names, not numbers: most of its cells are words (a data row with one
    typo is a data row, refused for it, not skipped as a header)."""
    filled = [cell for cell in cells if cell]
    words = sum(_number(cell, decimal_comma) is None for cell in filled)
    return bool(filled) and words * 2 >= len(filled)


def _number(cell: str, decimal_comma: bool) -> float | None:
    try:
        return float(cell.replace(",", ".") if decimal_comma else cell)
    except ValueError:
        return None


def _problems(path: Path, problems: list[str]) -> InvalidInput:
    shown = problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"… and {len(problems) - MAX_PROBLEMS} more")
    if len(shown) == 1:
        return InvalidInput(f"{path}: {shown[0]}.")
    return InvalidInput(f"{path}:\n" + "\n".join(f"  {line}" for line in shown))


# ---- out ----------------------------------------------------------------------------------


def check_output(_ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """A click callback: refuse an --output whose extension names no format we write, before
    any query runs."""
    if value is not None and value.suffix.lower() not in OUTPUT_FORMATS:
        known = ", ".join(f"{ext} ({name})" for ext, name in OUTPUT_FORMATS.items())
        raise click.BadParameter(f"{value} has no extension we write; use {known}.", param=param)
    return value


def write_result(path: Path, value: dict[str, Any], result: NDArray[Any]) -> None:
    """Write a decrypted result in the format of ``path``'s extension, 0600: CSV (one row per
    sample), NumPy (the array, at exactly this path) or JSON (``value``, as printed)."""
    import numpy as np

    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = result.reshape(1, -1) if result.ndim < 2 else result.reshape(len(result), -1)
        buffer = io.StringIO()
        np.savetxt(buffer, rows, delimiter=",", fmt="%.10g")
        data = buffer.getvalue().encode()
    elif suffix == ".npy":
        out = io.BytesIO()
        np.save(out, result, allow_pickle=False)
        data = out.getvalue()
    elif suffix == ".json":
        data = (json.dumps(value, indent=2) + "\n").encode()
    else:  # check_output refused it already
        raise InvalidInput(f"{path}: unknown output format {suffix!r}")
    write_private_bytes(path, data)


def write_private_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, 0600 from the first byte (a decrypted answer is the end
    user's alone); the directory the user chose is left as it is."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    except OSError as exc:
        raise click.FileError(str(path), hint=exc.strerror or str(exc)) from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), FILE_MODE)  # a file that was there before keeps its mode otherwise
        f.write(data)
