"""Atomic file writes (a reader sees the old file or the complete new one, never a part),
the generated blocks of a text file (between two marker lines, rewritten in place), and the
checked reading of a ``.npy`` member's header, so that no file we read can make us
allocate more than it holds.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import math
import os
import re
import secrets
from pathlib import Path

import numpy as np


def atomic_write(path, write) -> None:
    """Call ``write(f)`` on a binary file object, then move the result to ``path`` atomically.

    The data goes to a temporary file ``.<name>.<random>.tmp`` in the folder of ``path``
    (the same file system, so ``os.replace`` is atomic), which is flushed and fsynced, then
    renamed over ``path``; the folder is fsynced too, so the rename survives a power cut.
    The file is created with mode 0o666 less the umask, as ``open`` would; ``mkstemp``'s
    0o600 would survive the rename and hide checkpoints and data from other users.

    If ``write`` (or anything after it) raises, the temporary file is removed and the
    exception propagates: ``path`` is left as it was. ``write`` may raise on purpose (a
    checksum mismatch found while streaming, say) to keep bad data from its final name.
    The folder of ``path`` must exist.
    """
    path = Path(path)
    tmp = _temp_name(path)
    fd = _create(tmp, path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise _naming(exc, path) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def check_writable(path) -> None:
    """Raise ``OSError`` unless :func:`atomic_write` could write ``path``; change nothing.

    Creates and removes a temporary file beside ``path``, exactly as the write will, so a
    missing folder or a lack of permission shows before any long computation.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    tmp = _temp_name(path)
    os.close(_create(tmp, path))
    os.unlink(tmp)


def remove_stale_temporaries(folder, names) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``folder``.

    Only files named exactly as ``atomic_write`` names its temporaries for one of
    ``names`` are touched; returns the paths removed. Call it when no write to those
    names can be under way (at the start of a run that owns the folder).
    """
    folder = Path(folder)
    removed = []
    for name in names:
        pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{16}}\.tmp")
        for path in folder.glob(f".{glob.escape(name)}.*.tmp"):
            if pattern.fullmatch(path.name) and path.is_file():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def read_marked(path, start, end) -> str:
    """The text of the file ``path`` between its ``start`` and ``end`` marker lines.

    The newline after ``start`` is not part of it, so ``read_marked`` returns exactly what
    :func:`replace_marked` wrote. Raises ``ValueError`` naming ``path`` unless the file has
    one ``start`` before one ``end``.
    """
    return _marked_parts(Path(path), start, end)[1]


def replace_marked(path, start, end, body: str) -> Path:
    """Replace the text of ``path`` between its ``start`` and ``end`` markers with ``body``.

    Everything outside the markers is kept byte for byte; the file is rewritten atomically,
    so a block generated from the code (a table in a README) can be regenerated at will.
    Raises ``ValueError`` naming ``path`` unless it has one ``start`` before one ``end``.
    """
    path = Path(path)
    head, _, tail = _marked_parts(path, start, end)
    new = f"{head}{start}\n{body}{end}{tail}"
    atomic_write(path, lambda f: f.write(new.encode("utf-8")))
    return path


def _marked_parts(path: Path, start: str, end: str) -> tuple[str, str, str]:
    """``(before start, between the markers, after end)`` of the text of ``path``."""
    text = path.read_text(encoding="utf-8")
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{path}: needs one {start!r} line before one {end!r} line")
    head, rest = text.split(start)
    body, tail = rest.split(end)
    return head, body.removeprefix("\n"), tail


def read_npy_header(z, info) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` member ``info`` of the open zip ``z``.

    Reads only the header. Raises ``ValueError`` if the member is not a ``.npy`` array,
    holds Python objects, or declares more bytes (``prod(shape) * itemsize``) than the
    member stores, so a forged header cannot make the reader allocate terabytes.
    """
    with z.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
        except (ValueError, OSError, SyntaxError, EOFError) as exc:
            raise ValueError(f"not a .npy array ({exc})") from None
    if dtype.hasobject:
        raise ValueError("holds Python objects")
    declared = math.prod(shape) * dtype.itemsize
    if declared > info.file_size:
        raise ValueError(f"declares a {dtype} array of shape {shape} ({declared} bytes) but "
                         f"stores {info.file_size} bytes")
    return tuple(shape), fortran, dtype


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def _create(tmp: Path, path: Path) -> int:
    try:
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                       0o666)
    except OSError as exc:
        raise _naming(exc, path) from exc


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path``, which the user gave, instead of the temporary file.

    ``OSError(errno, ...)`` picks the subclass (``FileNotFoundError``, ...) from the errno.
    """
    return OSError(exc.errno, exc.strerror, str(path))


def _fsync_dir(folder: Path) -> None:
    # Not every platform can open or fsync a directory (Windows cannot); the data itself is
    # already safe, only the rename might not survive a crash there.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def describe_error(e: Exception) -> str:
    """One line for a command's error message: ``PATH: reason`` for an OS error that names
    its path (``SRC -> DST`` for a rename), else the exception's own text."""
    if isinstance(e, OSError) and e.filename is not None:
        paths = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{paths}: {e.strerror or e}"
    return str(e)
