"""Tests for stn_numpy._io: atomic writes leave the old file or the whole new one."""

import os
import stat

import pytest

from stn_numpy import _io
from stn_numpy._io import atomic_write, check_writable, read_marked, replace_marked


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_honours_the_umask(tmp_path, umask_022):
    path = tmp_path / "out.bin"
    atomic_write(path, lambda f: f.write(b"data"))
    assert path.read_bytes() == b"data"
    assert mode(path) == 0o644  # 0o666 less the umask; a mkstemp file would be 0o600
    assert os.listdir(tmp_path) == ["out.bin"]


def test_replaces_an_existing_file(tmp_path, umask_022):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and mode(path) == 0o644


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path, error):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    seen = []

    def write(f):
        seen.extend(name for name in os.listdir(tmp_path) if name != "out.bin")
        f.write(b"half")
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, write)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]
    # The temporary file was hidden, beside the target, and named after it.
    assert len(seen) == 1 and seen[0].startswith(".out.bin.") and seen[0].endswith(".tmp")


def test_failed_rename_leaves_no_temp(tmp_path):
    target = tmp_path / "a_folder"
    target.mkdir()
    with pytest.raises(IsADirectoryError) as exc:
        atomic_write(target, lambda f: f.write(b"x"))
    assert os.listdir(tmp_path) == ["a_folder"] and os.listdir(target) == []
    # The error names the path the caller gave, not the temporary file.
    assert exc.value.filename == str(target) and exc.value.filename2 is None


def test_a_missing_folder_is_reported_by_the_target_path(tmp_path):
    target = tmp_path / "missing" / "out.bin"
    for call in (lambda: atomic_write(target, lambda f: f.write(b"x")),
                 lambda: check_writable(target)):
        with pytest.raises(FileNotFoundError) as exc:
            call()
        assert exc.value.filename == str(target)


def test_directory_fsync_is_best_effort(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError("directories cannot be synced here")
        real_fsync(fd)

    monkeypatch.setattr(_io.os, "fsync", fsync)
    atomic_write(tmp_path / "out.bin", lambda f: f.write(b"data"))
    assert (tmp_path / "out.bin").read_bytes() == b"data"


def test_check_writable_changes_nothing_and_reports_problems(tmp_path):
    check_writable(tmp_path / "new.json")
    assert os.listdir(tmp_path) == []
    (tmp_path / "old.json").write_bytes(b"keep")
    check_writable(tmp_path / "old.json")
    assert (tmp_path / "old.json").read_bytes() == b"keep"
    with pytest.raises(FileNotFoundError):
        check_writable(tmp_path / "missing" / "x.json")
    with pytest.raises(IsADirectoryError):
        check_writable(tmp_path)
    assert os.listdir(tmp_path) == ["old.json"]


def test_stale_temporaries_are_exactly_those_atomic_write_leaves(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    monkeypatch.setattr(_io.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(_io.os, "unlink", lambda p: None)  # as if killed before the clean-up
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, lambda f: f.write(b"partial"))
    monkeypatch.undo()
    (leftover,) = tmp_path.iterdir()
    others = [tmp_path / ".metrics.csv.tmp", tmp_path / ".other.0123456789abcdef.tmp",
              tmp_path / "metrics.csv"]
    for path in others:
        path.write_text("keep")
    assert _io.remove_stale_temporaries(tmp_path, ["metrics.csv", "curves.png"]) == [leftover]
    assert sorted(tmp_path.iterdir()) == sorted(others)


def test_replace_marked_rewrites_only_the_block(tmp_path):
    path = tmp_path / "doc.md"
    outside = ("# t\n\nbefore\n", "\nafter\n")
    path.write_text(f"{outside[0]}<!-- a -->\nold\n<!-- b -->{outside[1]}")
    replace_marked(path, "<!-- a -->", "<!-- b -->", "new\nblock\n")
    assert path.read_text() == f"{outside[0]}<!-- a -->\nnew\nblock\n<!-- b -->{outside[1]}"
    assert read_marked(path, "<!-- a -->", "<!-- b -->") == "new\nblock\n"
    for text in ("no markers\n", "<!-- b -->\n<!-- a -->\n", "<!-- a -->\n<!-- a -->\n<!-- b -->"):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"{path}: needs one '<!-- a -->'"):
            replace_marked(path, "<!-- a -->", "<!-- b -->", "x\n")
        assert path.read_text() == text


# --- What a path is, checked before anything else ------------------------------------


@pytest.fixture
def fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def test_writers_refuse_a_device_and_a_fifo(fifo):
    for path in (fifo, "/dev/null"):
        if not os.path.exists(path):
            continue
        before = os.stat(path).st_mode
        with pytest.raises(OSError, match="not a regular file; refusing to replace it"):
            atomic_write(path, lambda f: f.write(b"x"))
        with pytest.raises(OSError, match="not a regular file"):
            check_writable(path)
        assert os.stat(path).st_mode == before  # still the device or the FIFO
    assert os.listdir(fifo.parent) == ["pipe"]


def test_readers_refuse_a_device_and_a_fifo_without_blocking(fifo, tmp_path):
    for path in (fifo, "/dev/zero"):
        if os.path.exists(path):
            with pytest.raises(OSError, match="not a regular file; refusing to read it"):
                _io.open_regular(path)
    with pytest.raises(IsADirectoryError):
        _io.open_regular(tmp_path)
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 100)
    with pytest.raises(OSError, match="more than the 99 this file may have"):
        _io.read_regular(big, 99)
    assert _io.read_regular(big, 100) == b"x" * 100


def test_atomic_write_all_changes_nothing_unless_every_write_succeeds(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"old a")

    def fail(f):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _io.atomic_write_all([(a, lambda f: f.write(b"new a")), (b, fail)])
    assert a.read_bytes() == b"old a" and sorted(os.listdir(tmp_path)) == ["a"]
    b.mkdir()
    with pytest.raises(IsADirectoryError):  # checked before anything is written
        _io.atomic_write_all([(a, lambda f: f.write(b"new a")), (b, lambda f: None)])
    assert a.read_bytes() == b"old a" and sorted(os.listdir(tmp_path)) == ["a", "b"]
    with pytest.raises(ValueError, match="same file"):
        _io.atomic_write_all([(a, lambda f: None), (tmp_path / "." / "a", lambda f: None)])


def test_compressed_members_are_refused(tmp_path):
    import zipfile

    import numpy as np

    path = tmp_path / "c.npz"
    np.savez_compressed(path, x=np.zeros(10))
    with zipfile.ZipFile(path) as z, pytest.raises(ValueError, match="compressed"):
        _io.read_npy_header(z, z.infolist()[0])


def test_folder_lock_refuses_a_second_process_and_is_reentrant(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("fcntl")
    code = ("import sys; from stn_numpy._io import folder_lock\n"
            "try:\n    with folder_lock(sys.argv[1]): pass\n"
            "except OSError as e:\n    print(e); sys.exit(2)\n")
    with _io.folder_lock(tmp_path), _io.folder_lock(tmp_path):  # re-entrant in-process
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                               capture_output=True, text=True)
        assert other.returncode == 2 and "in use by another stn-numpy command" in other.stdout
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == 0
    assert os.listdir(tmp_path) == []  # no lock file left behind
