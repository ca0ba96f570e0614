"""Blocking file operations shared by the ledger's journal and the store logs.

Every ``OSError`` becomes :class:`~proxy.errors.StateError` in :func:`os_errors`, naming
the file; callers run these in worker threads (:class:`~proxy.store.io.BoundedIo`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from proxy.errors import StateError


@contextlib.contextmanager
def os_errors(action: str, path: Path) -> Iterator[None]:
    """The one place where ``OSError`` becomes ``StateError``."""
    try:
        yield
    except OSError as e:
        raise StateError(f"cannot {action} {path}: {e.strerror or e}") from e


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def truncate(path: Path, length: int) -> None:
    """Cut ``path`` to ``length`` bytes and fsync it (raises ``OSError``)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, length)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, content: bytes) -> None:
    """Replace ``path`` with ``content`` atomically and durably (raises ``OSError``).

    Write ``<path>.tmp``, fsync it, rename it over ``path``, fsync the directory: a
    crash leaves the old file or the new one.  A failed write removes the temporary
    file, to give a full disk its space back.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)
