"""Writing files so that an interrupted or failed write never destroys what was there."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "check_writable", "temp_file_beside"]


def temp_file_beside(path: str | os.PathLike) -> Path:
    """Create an empty, uniquely named file in ``path``'s folder (``.<stem>-<random><suffix>``) and return it.

    Unlike ``tempfile.mkstemp`` (always mode 0600), the file is created with mode 0666 less the
    process umask, as ``open`` would create ``path`` itself: a renamed temporary file is the output,
    and should be as readable as the other files the user writes.
    """
    path = Path(path)
    for _ in range(100):
        tmp = path.parent / f".{path.stem}-{secrets.token_hex(4)}{path.suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The rename is atomic on POSIX, so ``path`` holds either the old or the complete new file.
    The temporary name keeps ``path``'s suffix, since writers such as numpy and matplotlib
    choose the format from it. The file gets the mode ``open`` would give it (0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_beside(path)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Raise ``PermissionError`` / ``NotADirectoryError`` now if ``path`` could not be written later.

    For checking an output before hours of work: the nearest existing folder on ``path``'s way must be a
    folder in which a file can be created (tried for real, which also catches read-only mounts and works
    for root, whom ``os.access`` does not stop); missing folders below it are created at write time, as
    ``atomic_write`` does. ``what`` names the output in the message (e.g. "--out").
    """
    path = Path(path).absolute()
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory; give a file name")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {what} {path}: {folder} is a file, not a folder")
    try:
        temp_file_beside(folder / "write-check").unlink()  # .write-check-<random>
    except OSError as e:
        raise PermissionError(
            f"cannot write {what} {path}: no file can be created in {folder} ({e.strerror or e}); "
            "choose a writable location"
        ) from None
