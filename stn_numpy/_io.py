"""Atomic file writes (a reader sees the old file or the complete new one, never a part),
the generated blocks of a text file (between two marker lines, rewritten in place), and the
checked reading of a ``.npy`` member's header, so that no file we read can make us
allocate more than it holds.

Every path is checked for what it is before anything else: a writer replaces only a
regular file (or creates one), never a device, a FIFO, a socket or a folder, and a reader
opens only a regular file, so that ``/dev/zero`` cannot fill memory and a FIFO cannot
block a command forever. Neither writes nor reads ever go *through* a device on purpose.
:func:`folder_lock` keeps two commands from working in one folder at the same time.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import math
import os
import re
import secrets
import stat
import threading
import zipfile
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
    The folder of ``path`` must exist. A ``path`` that exists and is not a regular file (a
    folder, a device such as ``/dev/null``, a FIFO, a socket) is refused with ``OSError``
    naming it before anything is written: the rename would replace it with a regular file.
    """
    atomic_write_all([(path, write)])


def atomic_write_all(items) -> None:
    """:func:`atomic_write` for several ``(path, write)`` pairs that belong together.

    Every destination is checked first, then every temporary file is written and fsynced,
    and only then are they renamed into place, one after the other. If anything fails
    before the renames (a check, a ``write``, a full disk), every temporary is removed and
    no destination has changed. Two items may not name the same path.
    """
    paths = [Path(path) for path, _ in items]
    if len({os.path.abspath(p) for p in paths}) != len(paths):
        raise ValueError(f"two outputs would go to the same file: {[str(p) for p in paths]}")
    for path in paths:
        check_destination(path)
    temporaries = []
    try:
        for path, (_, write) in zip(paths, items, strict=True):
            tmp = _temp_name(path)
            fd = _create(tmp, path)
            temporaries.append(tmp)
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for i, (tmp, path) in enumerate(zip(temporaries, paths, strict=True)):
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise _naming(exc, path) from exc
            temporaries[i] = None
    except BaseException:
        for tmp in temporaries:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        raise
    for folder in {path.parent for path in paths}:
        _fsync_dir(folder)


def check_destination(path) -> Path:
    """``path``, unless it exists and is not a regular file: then ``OSError`` naming it.

    A folder gives ``IsADirectoryError``; a device, FIFO or socket an ``OSError`` saying
    what it is. A symbolic link is judged by what it points to.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return path
    except ValueError as exc:  # a NUL byte in the name
        raise OSError(errno.EINVAL, str(exc), str(path)) from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode, "replace")
    return path


def open_regular(path, max_bytes: int | None = None):
    """Open ``path`` for reading in binary mode, only if it is a regular file.

    The file is opened without blocking (a FIFO would otherwise wait for a writer) and
    its kind checked on the open descriptor, so nothing can swap it in between. Raises
    ``FileNotFoundError`` if it is missing, ``IsADirectoryError`` for a folder, an
    ``OSError`` naming a device, FIFO or socket, and, with ``max_bytes``, an ``OSError``
    for a file larger than that (so that no reader holds more than it expects).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_BINARY", 0))
    except ValueError as exc:  # a NUL byte in the name
        raise OSError(errno.EINVAL, str(exc), str(path)) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, info.st_mode, "read")
        if max_bytes is not None and info.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"holds {info.st_size} bytes, more than the "
                          f"{max_bytes} this file may have", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` (see
    :func:`open_regular`); a file that grows past the limit while read is refused too."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"holds more than the {max_bytes} bytes this file may "
                      f"have", str(path))
    return data


def _not_regular(path: Path, mode: int, action: str) -> OSError:
    kind = ("a character device" if stat.S_ISCHR(mode) else "a block device"
            if stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket"
            if stat.S_ISSOCK(mode) else "not a regular file")
    return OSError(errno.EINVAL, f"is {kind}, not a regular file; refusing to {action} it",
                   str(path))


_HELD_LOCKS: dict = {}  # (st_dev, st_ino) of a locked folder -> [descriptor, holders]
_HELD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def folder_lock(folder):
    """Hold an exclusive lock on the existing ``folder`` for the ``with`` block.

    The lock is ``flock`` on the folder itself (no lock file is left behind), so it ends
    with the process however it ends. If another process holds it, ``OSError`` naming
    the folder is raised at once instead of waiting. Within one process it is re-entrant
    (the experiment trains into run folders it already holds). Where ``fcntl`` does not
    exist (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    folder = Path(folder)
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    with _HELD_LOCKS_GUARD:
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino)
        if key in _HELD_LOCKS:
            os.close(fd)
            _HELD_LOCKS[key][1] += 1
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise _naming(exc, folder) from exc
                raise OSError(errno.EBUSY, "in use by another stn-numpy command (it holds "
                              "this folder's lock); wait for it to end or choose another "
                              "folder", str(folder)) from None
            _HELD_LOCKS[key] = [fd, 1]
    try:
        yield
    finally:
        with _HELD_LOCKS_GUARD:
            entry = _HELD_LOCKS[key]
            entry[1] -= 1
            if not entry[1]:
                del _HELD_LOCKS[key]
                os.close(entry[0])  # closing the descriptor releases the lock


def check_writable(path) -> None:
    """Raise ``OSError`` unless :func:`atomic_write` could write ``path``; change nothing.

    Creates and removes a temporary file beside ``path``, exactly as the write will, so a
    missing folder or a lack of permission shows before any long computation.
    """
    path = check_destination(path)
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


MAX_TEXT_BYTES = 64 * 2**20  # a README or a JSON file of ours is a few hundred kB


def read_text(path, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of the regular file ``path`` (see :func:`read_regular`); a file that
    is not UTF-8 is a ``ValueError`` naming it."""
    try:
        return read_regular(path, max_bytes).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None


def _marked_parts(path: Path, start: str, end: str) -> tuple[str, str, str]:
    """``(before start, between the markers, after end)`` of the text of ``path``."""
    text = read_text(path)
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{path}: needs one {start!r} line before one {end!r} line")
    head, rest = text.split(start)
    body, tail = rest.split(end)
    return head, body.removeprefix("\n"), tail


def read_npy_header(z, info) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` member ``info`` of the open zip ``z``.

    Reads only the header. Raises ``ValueError`` if the member is compressed (``np.savez``
    stores members as they are, and a deflated one could inflate a small file to
    gigabytes), is not a ``.npy`` array, holds Python objects, or declares more bytes
    (``prod(shape) * itemsize``) than the member stores, so a forged header cannot make the
    reader allocate terabytes.
    """
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError("is compressed; only stored (np.savez, not np.savez_compressed) "
                         "members are read")
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
