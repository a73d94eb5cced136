"""Writing output files whole or not at all.

Every file fastdit writes for a user (videos, ``fastdit compare`` reports, PARO plan files) is
written under a temporary name in the target folder and renamed over the target only once it is
complete (``os.replace``, atomic within one filesystem). An interrupt, a full disk or a failing
writer leaves the previous file untouched and no partial file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "check_writable_file"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path`` (same folder, same extension, so writers that pick
    a format from the extension still do); on success it replaces ``path``, on any exception
    (``KeyboardInterrupt`` included) it is deleted and ``path`` is left as it was.

    The folder is created if needed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name, extension = os.path.splitext(os.path.basename(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=f".partial{extension}", dir=folder)
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have made
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def check_writable_file(path: str | os.PathLike, what: str = "output") -> str | None:
    """Why ``path`` cannot be written as a file (``None`` if it can), checked before the work
    that produces it: not an existing directory, and its folder can be created and written to
    (tried with a temporary file there, removed again). May create the folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return f"{what} {path!r} is an existing directory, not a file path"
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".fastdit-write-check.", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as exc:
        return f"{what} {path!r} cannot be written: {exc.strerror or exc} ({folder})"
    return None
