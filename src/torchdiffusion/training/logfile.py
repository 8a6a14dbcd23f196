"""A run's ``log.csv``, read back when it resumes."""

from __future__ import annotations

import csv
import os
from pathlib import Path

__all__ = ["read_log"]


def read_log(path: Path, upto: int, columns: tuple[str, ...]) -> list[dict[str, float]]:
    """The rows of ``path`` with step <= upto (``columns`` as floats, step as an int); the file is rewritten
    (atomically) to hold just those, so a resumed run appends after its checkpoint's step. A row cut short by a
    crash (missing cells) is dropped."""
    rows = []
    if path.exists():
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    parsed = {k: float(row[k]) for k in columns}
                except (TypeError, ValueError, KeyError):
                    continue
                if parsed["step"] <= upto:
                    rows.append({**parsed, "step": int(parsed["step"])})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return rows
