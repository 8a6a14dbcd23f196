"""Loading user data sets from ``.npy`` and ``.csv`` files.

Every loader returns a float32 tensor of shape (N, D) with N >= 2 and only finite values, or raises
an error that says what is wrong and where, so a bad file fails before any training starts.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .toy import TOY_DATASETS, make_2d

__all__ = ["SUPPORTED_SUFFIXES", "load_array", "load_dataset"]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".npy", ".csv")
# numpy's own message on a pickle suggests loading it with allow_pickle=True, which would run any code in it.
_PICKLED = "it holds pickled Python objects, which are never loaded (unpickling can run code); save numbers only"


def _suffix_error(path: Path) -> ValueError:
    got = path.suffix or "no suffix"
    return ValueError(f"{path}: unsupported file type ({got}); valid choices: {', '.join(SUPPORTED_SUFFIXES)}")


def load_array(path: str | os.PathLike) -> Tensor:
    """Load a data matrix from ``.npy`` or ``.csv`` as a float32 tensor of shape (N, D), N >= 2.

    CSV files hold comma-separated numbers, one sample per line; a single first line whose cells are
    all non-numeric (column names) is skipped, as are blank lines and lines starting with ``#``
    (``numpy.savetxt`` headers). Errors in a CSV file name the 1-based line number (as a text editor
    shows it) and 1-based column; errors in a ``.npy`` file name 0-based indices.

    Raises:
        ValueError: unsupported suffix, wrong shape, non-numeric cell, NaN or inf.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise _suffix_error(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if suffix == ".npy":
        array = _read_npy(path)

        def where(i: int, j: int) -> tuple[str, str]:
            return f"row {i}", f"column {j}; indices are 0-based"
    else:
        array, lines = _read_csv(path)

        def where(i: int, j: int) -> tuple[str, str]:
            return f"row {lines[i]}", f"column {j + 1}"

    _check_shape(path, array)
    _check_finite(path, array, where)
    # float64 values beyond ~3.4e38 become inf in float32: let the cast overflow quietly, then report
    # those cells below rather than train on inf.
    with np.errstate(over="ignore"):
        tensor = torch.from_numpy(array.astype(np.float32))
    _check_finite(path, tensor.numpy(), where, note=" after conversion to float32 (magnitude above 3.4e38)")
    return tensor


def _read_npy(path: Path) -> np.ndarray:
    try:
        # allow_pickle=False: a .npy file from elsewhere must not be able to run code on load.
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err):  # numpy's words for an object array and for a whole-file pickle alike
            raise ValueError(f"{path}: not a plain numeric .npy array: {_PICKLED}") from None
        raise ValueError(f"{path}: not a plain numeric .npy array ({err})") from None
    if array.dtype.kind not in "iuf":  # bool, complex, strings, datetimes are not data points
        raise ValueError(f"{path}: expected a real numeric array (int or float), got dtype {array.dtype}")
    return array.astype(np.float64, copy=False)


def _to_float(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _read_csv(path: Path) -> tuple[np.ndarray, list[int]]:
    """Parse with the csv module (not numpy) so every error can point at its line and column.

    Returns the values and, for each data row, its 1-based line number in the file.
    """
    rows: list[list[float]] = []
    lines: list[int] = []
    header: list[str] | None = None
    seen_content = False
    # utf-8-sig: spreadsheet programs often write a byte-order mark that would spoil the first cell.
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
                continue
            values = [_to_float(c) for c in cells]
            if not seen_content and all(v is None for v in values):
                header, seen_content = [c.strip() for c in cells], True
                continue
            seen_content = True
            for j, v in enumerate(values):
                if v is None:
                    name = f" ({header[j]!r})" if header is not None and j < len(header) else ""
                    raise ValueError(f"{path}: row {line}, column {j + 1}{name}: cannot parse {cells[j]!r} as a number")
            expected, source = (len(rows[0]), f"row {lines[0]}") if rows else (None, "")
            if expected is None and header is not None:
                expected, source = len(header), "the header"
            if expected is not None and len(values) != expected:
                raise ValueError(f"{path}: row {line} has {len(values)} columns, expected {expected} (as in {source})")
            rows.append(values)  # type: ignore[arg-type]  # no None left after the loop above
            lines.append(line)
    if not rows:
        raise ValueError(f"{path}: no data rows found; expected shape (N, D) with N >= 2")
    return np.asarray(rows, dtype=np.float64), lines


def _check_shape(path: Path, array: np.ndarray) -> None:
    shape = tuple(array.shape)
    if array.ndim != 2:
        hint = "; store 1-D data as one column, shape (N, 1)" if array.ndim == 1 else ""
        raise ValueError(f"{path}: expected a 2-D array of shape (N, D), got shape {shape}{hint}")
    if shape[0] < 2 or shape[1] < 1:
        raise ValueError(f"{path}: expected shape (N, D) with N >= 2 and D >= 1, got shape {shape}")


def _check_finite(path: Path, array: np.ndarray, where: Callable[[int, int], tuple[str, str]], note: str = "") -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        i, j = (int(k) for k in np.argwhere(bad)[0])  # argwhere is row-major: first bad row first
        value = array[i, j]
        what = "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
        row, col = where(i, j)
        raise ValueError(f"{path}: {row} contains {what} ({col}){note}")


def load_dataset(spec: str | os.PathLike, n: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Built-in 2-D dataset by name, or a user ``.npy`` / ``.csv`` file by path.

    A name from :data:`TOY_DATASETS` draws ``n`` fresh float32 points with ``generator``. A file is
    returned whole, all N rows, in file order: ``n`` and ``generator`` are ignored, so subsampling
    or shuffling stays an explicit choice of the caller.

    Raises:
        ValueError: ``spec`` is neither a built-in name nor an existing ``.npy`` / ``.csv`` file,
            or the file fails the checks of :func:`load_array`.
    """
    if isinstance(spec, str) and spec in TOY_DATASETS:
        return make_2d(spec, n, generator=generator)
    path = Path(spec)
    has_suffix = path.suffix.lower() in SUPPORTED_SUFFIXES
    if has_suffix and path.is_file():
        return load_array(path)
    reason = "file not found" if has_suffix else "not a built-in dataset name"
    raise ValueError(
        f"unknown dataset {str(spec)!r} ({reason}); built-in names: {', '.join(sorted(TOY_DATASETS))}; "
        f"data files must end in {' or '.join(SUPPORTED_SUFFIXES)}"
    )
