"""Tests for stn_numpy.data.mnist: the real files if present, and small hand-made IDX files
for every way a file can be wrong. The network is never used: the downloader is fed bytes
through a replaced ``_urlopen``."""

import gzip
import hashlib
import io
import os
import re
import stat
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from stn_numpy import _io
from stn_numpy.data import mnist
from stn_numpy.data.mnist import (
    ChecksumError,
    DatasetNotFoundError,
    load_mnist,
    read_idx,
    resolve_root,
)

# Label counts of the original MNIST distribution, digits 0 to 9 (LeCun et al.).
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

TRAIN_IMAGES, TRAIN_LABELS = mnist.FILES["train"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(url, timeout):
        raise AssertionError(f"a test tried to open {url}")

    monkeypatch.setattr(mnist, "_urlopen", refuse)


@pytest.fixture(scope="module")
def train(mnist_dir):
    return load_mnist("train", mnist_dir, download=False)


@pytest.fixture(scope="module")
def test_split(mnist_dir):
    return load_mnist("test", mnist_dir, download=False)


def idx_bytes(array, magic=None):
    """An IDX file's bytes for ``array`` (uint8 unless it says otherwise)."""
    array = np.asarray(array)
    codes = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}
    if magic is None:
        magic = codes[array.dtype.str[1:]] << 8 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_split(root, images, labels, split="train"):
    """Write ``images`` and ``labels`` as gzip'd IDX files under the split's standard names."""
    root.mkdir(parents=True, exist_ok=True)
    image_name, label_name = mnist.FILES[split]
    (root / image_name).write_bytes(gzip.compress(idx_bytes(np.asarray(images, np.uint8))))
    (root / label_name).write_bytes(gzip.compress(idx_bytes(np.asarray(labels, np.uint8))))
    return root / image_name, root / label_name


def fake_split(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


# --- the real files -------------------------------------------------------------------------


def test_train_split(train):
    images, labels = train
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.int64
    assert np.bincount(labels, minlength=10).tolist() == TRAIN_COUNTS
    assert labels[0] == 5
    assert images.min() == 0 and images.max() == 255
    assert images.flags.writeable


def test_test_split(test_split):
    images, labels = test_split
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels, minlength=10).tolist() == TEST_COUNTS
    assert labels[0] == 7
    assert images.min() == 0 and images.max() == 255


def test_checksum_constants_match_sha256sums(mnist_dir):
    sums_file = Path(mnist_dir) / "SHA256SUMS"
    if not sums_file.is_file():
        pytest.skip(f"no SHA256SUMS in {mnist_dir}")
    sums = {}
    for line in sums_file.read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    assert sums == mnist.SHA256


def test_real_root_via_environment(mnist_dir, monkeypatch):
    monkeypatch.setenv(mnist.ENV_VAR, mnist_dir)
    images, labels = load_mnist("test", download=False)
    assert len(images) == len(labels) == 10000


# --- read_idx --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, compress):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    data = idx_bytes(array)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    path.write_bytes(gzip.compress(data) if compress else data)
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable


def test_read_idx_detects_gzip_by_content(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(gzip.compress(idx_bytes(np.array([1, 2, 3], np.uint8))))
    np.testing.assert_array_equal(read_idx(path), [1, 2, 3])


def test_read_idx_wrong_magic(tmp_path):
    path = tmp_path / "labels.idx"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(ValueError, match=r"labels\.idx.*magic number 2049.*expected 2051"):
        read_idx(path, magic=mnist.IMAGE_MAGIC)


@pytest.mark.parametrize("magic", [0x01020803, 0x00000703, 0x00000800])
def test_read_idx_not_an_idx_magic(tmp_path, magic):
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(np.zeros((1, 2, 2), np.uint8), magic=magic))
    with pytest.raises(ValueError, match=r"x\.idx.*not an IDX magic number"):
        read_idx(path)


@pytest.mark.parametrize("cut", [1, 100])
def test_read_idx_truncated_payload(tmp_path, cut):
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-cut]))
    with pytest.raises(ValueError, match=r"images\.gz.*2 x 28 x 28.*truncated"):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "images.idx"
    path.write_bytes(idx_bytes(np.zeros((2, 3, 3), np.uint8)) + b"\0")
    with pytest.raises(ValueError, match="unexpected bytes"):
        read_idx(path)


@pytest.mark.parametrize("size", [0, 3, 9])
def test_read_idx_truncated_header(tmp_path, size):
    path = tmp_path / "images.idx"
    path.write_bytes(idx_bytes(np.zeros((2, 3, 3), np.uint8))[:size])
    with pytest.raises(ValueError, match=r"images\.idx.*(too short|truncated)"):
        read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "images.gz"
    whole = gzip.compress(idx_bytes(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)))
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"images\.gz: not a valid gzip file"):
        read_idx(path)


def test_read_idx_gz_name_but_not_gzip(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(ValueError, match=r"images\.gz: not a valid gzip file"):
        read_idx(path)


# --- load_mnist on hand-made files ----------------------------------------------------------


def test_load_mnist_fake_files(tmp_path):
    images, labels = fake_split(n=5)
    write_split(tmp_path, images, labels)
    out_images, out_labels = load_mnist("train", tmp_path, download=False, verify=False)
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(out_labels, labels)
    assert out_labels.dtype == np.int64


def test_load_mnist_checksum_mismatch(tmp_path):
    write_split(tmp_path, *fake_split())
    with pytest.raises(ChecksumError, match=rf"{TRAIN_IMAGES}: SHA-256 .*delete it"):
        load_mnist("train", tmp_path, download=False)


def test_load_mnist_count_mismatch(tmp_path):
    images, labels = fake_split(n=4)
    image_path, label_path = write_split(tmp_path, images, labels[:3])
    message = f"{image_path} holds 4 images but {label_path} holds 3 labels"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_mnist("train", tmp_path, download=False, verify=False)


def test_load_mnist_swapped_files(tmp_path):
    images, labels = fake_split()
    image_path, label_path = write_split(tmp_path, images, labels)
    image_bytes = image_path.read_bytes()
    image_path.write_bytes(label_path.read_bytes())
    label_path.write_bytes(image_bytes)
    with pytest.raises(ValueError, match=rf"{TRAIN_IMAGES}: magic number 2049.*expected 2051"):
        load_mnist("train", tmp_path, download=False, verify=False)


def test_load_mnist_wrong_image_size(tmp_path):
    write_split(tmp_path, np.zeros((2, 20, 20), np.uint8), [0, 1])
    with pytest.raises(ValueError, match=r"images of shape \(20, 20\), expected \(28, 28\)"):
        load_mnist("train", tmp_path, download=False, verify=False)


def test_load_mnist_label_out_of_range(tmp_path):
    write_split(tmp_path, np.zeros((2, 28, 28), np.uint8), [3, 10])
    with pytest.raises(ValueError, match="label 10 found"):
        load_mnist("train", tmp_path, download=False, verify=False)


@pytest.mark.parametrize("split", ["valid", None, ["train"], {"train": 1}])
def test_load_mnist_bad_split(tmp_path, split):
    # Unhashable splits included: a dict lookup would raise an unhelpful TypeError.
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train'\], got"):
        load_mnist(split, tmp_path)


@pytest.mark.parametrize("root", [3, b"/tmp/mnist", ["data"]])
def test_load_mnist_bad_root(root):
    with pytest.raises(TypeError, match="root must be a str, an os.PathLike or None"):
        load_mnist("test", root, download=False)


def test_load_mnist_missing_without_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist("test", tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "nowhere") in message
    assert all(name in message for name in mnist.SHA256)
    assert mnist.ENV_VAR in message and "--data-dir" in message


# --- root resolution ------------------------------------------------------------------------


def test_resolve_root_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(mnist.ENV_VAR, raising=False)
    assert resolve_root() == tmp_path / "data" / "mnist"
    monkeypatch.setenv(mnist.ENV_VAR, "")
    assert resolve_root() == tmp_path / "data" / "mnist"
    monkeypatch.setenv(mnist.ENV_VAR, str(tmp_path / "from-env"))
    assert resolve_root() == tmp_path / "from-env"
    assert resolve_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_root("relative") == tmp_path / "relative"


def test_load_mnist_uses_environment(tmp_path, monkeypatch):
    images, labels = fake_split(n=2)
    write_split(tmp_path / "env", images, labels, split="test")
    monkeypatch.setenv(mnist.ENV_VAR, str(tmp_path / "env"))
    np.testing.assert_array_equal(load_mnist("test", download=False, verify=False)[0], images)


# --- download -------------------------------------------------------------------------------


@pytest.fixture
def fake_mirrors(monkeypatch):
    """Two fake mirrors serving small hand-made files whose sums replace the real ones.

    Returns (served, requested, files): ``served[mirror][name]`` is bytes to serve or an
    exception to raise (absent: HTTP 404), ``requested`` lists the URLs opened in order,
    ``files`` maps each name to its good bytes.
    """
    images, labels = fake_split(n=3)
    files = {}
    for split in mnist.FILES:
        image_name, label_name = mnist.FILES[split]
        files[image_name] = gzip.compress(idx_bytes(images))
        files[label_name] = gzip.compress(idx_bytes(labels.astype(np.uint8)))
    mirrors = ("https://a.invalid/mnist/", "https://b.invalid/mnist/")
    served = {mirror: {} for mirror in mirrors}
    requested = []

    def urlopen(url, timeout):
        assert timeout > 0
        requested.append(url)
        mirror, name = url.rsplit("/", 1)
        answer = served[mirror + "/"].get(name)
        if answer is None:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        if isinstance(answer, Exception):
            raise answer
        return answer if hasattr(answer, "read") else io.BytesIO(answer)

    monkeypatch.setattr(mnist, "MIRRORS", mirrors)
    monkeypatch.setattr(mnist, "_urlopen", urlopen)
    monkeypatch.setattr(
        mnist, "SHA256", {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    )
    return served, requested, files


def test_download_falls_back_to_second_mirror(tmp_path, fake_mirrors):
    served, requested, files = fake_mirrors
    first, second = mnist.MIRRORS
    served[first][TRAIN_IMAGES] = urllib.error.URLError("Name or service not known")
    served[second] = dict(files)
    root = tmp_path / "new" / "mnist"
    images, labels = load_mnist("train", root)
    assert images.shape == (3, 28, 28) and labels.shape == (3,)
    assert requested == [
        first + TRAIN_IMAGES,
        second + TRAIN_IMAGES,
        first + TRAIN_LABELS,
        second + TRAIN_LABELS,
    ]
    assert sorted(os.listdir(root)) == sorted([TRAIN_IMAGES, TRAIN_LABELS])
    assert (root / TRAIN_IMAGES).read_bytes() == files[TRAIN_IMAGES]
    # Present now: a second load reads the files and opens nothing.
    load_mnist("train", root)
    assert len(requested) == 4


def test_download_only_the_missing_file(tmp_path, fake_mirrors):
    served, requested, files = fake_mirrors
    served[mnist.MIRRORS[0]] = dict(files)
    (tmp_path / TRAIN_IMAGES).write_bytes(files[TRAIN_IMAGES])
    load_mnist("train", tmp_path)
    assert requested == [mnist.MIRRORS[0] + TRAIN_LABELS]


def test_download_bad_checksum_leaves_no_file(tmp_path, fake_mirrors):
    served, requested, files = fake_mirrors
    for mirror in mnist.MIRRORS:
        served[mirror] = {name: data[:-1] + b"x" for name, data in files.items()}
    with pytest.raises(DatasetNotFoundError, match="SHA-256") as info:
        load_mnist("train", tmp_path)
    assert all(mirror + TRAIN_IMAGES in str(info.value) for mirror in mnist.MIRRORS)
    assert os.listdir(tmp_path) == []


def test_download_bad_checksum_never_takes_the_final_name(tmp_path, fake_mirrors, monkeypatch):
    # Checked while streaming, before the rename: a reader never sees a wrong file under
    # the real name, not even for a moment.
    served, requested, files = fake_mirrors
    for mirror in mnist.MIRRORS:
        served[mirror] = {name: data[:-1] + b"x" for name, data in files.items()}
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(_io.os, "replace", lambda a, b: renamed.append(b) or real_replace(a, b))
    with pytest.raises(DatasetNotFoundError, match="SHA-256"):
        load_mnist("train", tmp_path)
    assert renamed == [] and os.listdir(tmp_path) == []


def test_downloaded_files_are_readable_by_others_under_umask_022(tmp_path, fake_mirrors):
    served, requested, files = fake_mirrors
    served[mnist.MIRRORS[0]] = dict(files)
    old = os.umask(0o022)
    try:
        load_mnist("test", tmp_path)
    finally:
        os.umask(old)
    for name in mnist.FILES["test"]:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == sorted(mnist.FILES["test"])


def test_download_interrupted_leaves_no_file(tmp_path, fake_mirrors):
    served, requested, files = fake_mirrors

    class Broken(io.BytesIO):
        def read(self, size=-1):
            if self.tell() > 0:
                raise TimeoutError("The read operation timed out")
            return super().read(10)

    for mirror in mnist.MIRRORS:
        served[mirror] = {name: Broken(data) for name, data in files.items()}
    with pytest.raises(DatasetNotFoundError, match="timed out"):
        load_mnist("train", tmp_path)
    assert os.listdir(tmp_path) == []


def test_download_offline_error(tmp_path, fake_mirrors):
    served, requested, files = fake_mirrors
    for mirror in mnist.MIRRORS:
        served[mirror] = {name: urllib.error.URLError("offline") for name in files}
    root = tmp_path / "mnist"
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist("test", root)
    message = str(info.value)
    test_images, test_labels = mnist.FILES["test"]
    assert f"missing from {root}: {test_images}, {test_labels}" in message
    assert all(mirror + test_images in message for mirror in mnist.MIRRORS)
    assert all(name in message for name in mnist.SHA256)
    assert mnist.ENV_VAR in message and "--data-dir" in message
    # Giving up after the first file fails everywhere: an offline machine waits for one
    # file's worth of timeouts, not four.
    assert len(requested) == len(mnist.MIRRORS)
    assert os.listdir(root) == []


def test_a_gzip_bomb_is_refused_before_it_inflates(tmp_path, monkeypatch):
    import gzip

    from stn_numpy.data import mnist

    monkeypatch.setattr(mnist, "MAX_IDX_BYTES", 1000)
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(b"\0" * 100_000))
    with pytest.raises(ValueError, match="inflates to more than 1000 bytes"):
        mnist.read_idx(path)
