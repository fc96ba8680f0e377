"""Atomic file writes: every file ds_grace writes (plans, traces, reports, benchmark JSON) goes through here.

The new content is written beside the target (a hidden temporary file in the same folder), flushed and
fsync'ed, then renamed over the target with ``os.replace`` and the folder is fsync'ed. A reader sees the old
file or the new one, never a partial one: a process killed mid-write, a full disk or a file-size limit
leaves the old file as it was (and at most a stray ``.NAME.*.tmp`` beside it when the process is killed).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class FileWriteError(OSError):
    """A file could not be written; the message names the target, and the old file (if any) is intact."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open or fsync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary handle whose content replaces `path` atomically when the block ends without an error.

    On any error (also one raised by the caller inside the block) the temporary file is removed and
    `path` is left untouched. OS errors are raised as FileWriteError naming `path`.
    """
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise FileWriteError(21, "is a directory", str(target))
    try:
        fd, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise FileWriteError(exc.errno, exc.strerror, str(target)) from None
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, target)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, FileWriteError):
            raise FileWriteError(exc.errno, exc.strerror, str(target)) from exc
        raise
    _fsync_folder(folder)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode())


def save_figure(figure: Any, path: str | os.PathLike[str], *, dpi: int = 120) -> None:
    """Write a matplotlib figure atomically, in the format its file suffix names (png by default)."""
    with atomic_writer(path) as handle:
        figure.savefig(handle, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
