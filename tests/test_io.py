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
