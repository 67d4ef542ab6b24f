"""MNIST: find, download, verify and parse the four original IDX files.

The files are looked for in one folder, chosen by ``resolve_root``: the ``root`` argument
(``--data-dir`` on the command line), else the ``STN_NUMPY_DATA`` environment variable, else
``data/mnist`` under the current working directory.

A missing file is downloaded from each of ``MIRRORS`` in turn into a temporary file in that
folder, checked against its SHA-256 in ``SHA256`` and only then renamed to its final name, so
an interrupted or corrupted download never leaves a file that looks complete. Files already
present are checked against the same sums on every load (hashing all four files costs a few
tens of milliseconds); ``verify=False`` skips that check, for files that are not the
originals (small hand-made IDX files in tests, say).

IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a big-endian 32-bit magic
number ``0x0000TTDD`` (TT the element type, DD the number of dimensions), one big-endian
32-bit size per dimension, then the elements in row-major order. MNIST images have magic 2051
(``0x0803``: uint8, 3 dims), labels 2049 (``0x0801``: uint8, 1 dim).
"""

import hashlib
import logging
import math
import os
import urllib.request
import zlib
from http.client import HTTPException
from pathlib import Path

import numpy as np

from .._checks import check_choice
from .._io import atomic_write, read_regular

__all__ = [
    "DEFAULT_ROOT",
    "ENV_VAR",
    "FILES",
    "IMAGE_MAGIC",
    "LABEL_MAGIC",
    "MIRRORS",
    "SHA256",
    "ChecksumError",
    "DatasetNotFoundError",
    "load_mnist",
    "read_idx",
    "resolve_root",
]

logger = logging.getLogger(__name__)

ENV_VAR = "STN_NUMPY_DATA"
DEFAULT_ROOT = Path("data", "mnist")

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# In the format of `sha256sum`, as published beside the original files.
_SHA256SUMS = """\
440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609  train-images-idx3-ubyte.gz
3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c  train-labels-idx1-ubyte.gz
8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6  t10k-images-idx3-ubyte.gz
f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6  t10k-labels-idx1-ubyte.gz
"""
SHA256 = {name: digest for digest, name in map(str.split, _SHA256SUMS.splitlines())}

# The mirrors torchvision uses; yann.lecun.com itself now often refuses automated downloads.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

TIMEOUT = 30.0
#: The largest IDX file read, raw or inflated (MNIST's largest is 47 MB).
MAX_IDX_BYTES = 256 * 2**20

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049

_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetNotFoundError(FileNotFoundError):
    """MNIST files are missing and could not be downloaded."""


class ChecksumError(ValueError):
    """A file's SHA-256 differs from the original MNIST file's."""


def resolve_root(root=None):
    """The folder that holds (or will hold) the MNIST files.

    Parameters
    ----------
    root : str or os.PathLike or None
        An explicit folder (``--data-dir`` on the command line). ``None`` falls back to the
        ``STN_NUMPY_DATA`` environment variable (ignored when empty), then to
        ``DEFAULT_ROOT`` (``data/mnist``) under the current working directory.

    Returns
    -------
    pathlib.Path
        An absolute path, with ``~`` expanded; it need not exist.

    Raises
    ------
    TypeError
        ``root`` is neither None, a str nor an ``os.PathLike``.
    """
    if root is None:
        root = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    elif not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a str, an os.PathLike or None, got {type(root).__name__}")
    return Path(root).expanduser().absolute()


def read_idx(path, magic=None):
    """Parse an IDX file, gzip-compressed or raw, with full validation.

    A file whose name ends in ``.gz`` or whose first bytes are the gzip magic is decompressed
    first. Works for any IDX file, not only MNIST; checksums are not involved.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.
    magic : int or None
        If given, the magic number the file must carry (``IMAGE_MAGIC`` = 2051 or
        ``LABEL_MAGIC`` = 2049 for MNIST).

    Returns
    -------
    numpy.ndarray
        A writable array in native byte order, of the shape and element type the header
        declares; for MNIST, uint8 of shape (N, 28, 28) or (N,).

    Raises
    ------
    ValueError
        Naming the file, if it is not valid gzip, its magic number is not an IDX one (or not
        ``magic``), or its length differs from the one the header implies.
    """
    path = Path(path)
    raw = read_regular(path, MAX_IDX_BYTES)
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
            raw = inflate.decompress(raw, MAX_IDX_BYTES + 1)  # at most that, a bomb or not
            if len(raw) > MAX_IDX_BYTES:
                raise ValueError(f"{path}: inflates to more than {MAX_IDX_BYTES} bytes, "
                                 f"more than any IDX file of MNIST")
            if not inflate.eof:
                raise EOFError("compressed file ended before the end-of-stream marker")
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(
                f"{path}: not a valid gzip file ({err}); delete it and download it again"
            ) from None
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header; truncated?")
    found = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[:2] != b"\0\0" or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: magic number {found} (0x{found:08x}) is not an IDX magic number "
            "(0x0000TTDD, TT the element type, DD the number of dimensions)"
        )
    if magic is not None and found != magic:
        raise ValueError(
            f"{path}: magic number {found} (0x{found:08x}), expected {magic} (0x{magic:08x})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: {len(raw)} bytes, but a {ndim}-dimensional IDX header needs {header}; "
            "the file is truncated"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    count = math.prod(shape)
    need, have = count * dtype.itemsize, len(raw) - header
    if have != need:
        problem = "truncated" if have < need else "followed by unexpected bytes"
        dims = " x ".join(map(str, shape))
        raise ValueError(
            f"{path}: the header declares {dims} elements of {dtype.name} ({need} bytes) but "
            f"{have} bytes follow it: the file is {problem}; delete it and download it again"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def load_mnist(split, root=None, *, download=True, verify=True):
    """Load one MNIST split, downloading its files if they are missing.

    Parameters
    ----------
    split : {"train", "test"}
        "train" has 60000 examples, "test" 10000.
    root : str or os.PathLike or None
        Folder of the four ``.gz`` files; see ``resolve_root`` for the fallbacks.
    download : bool
        Fetch missing files from ``MIRRORS``. If False, a missing file raises at once.
    verify : bool
        Check files already present against the original SHA-256 sums. Pass False only to
        load files that are deliberately not the originals; downloads are always checked.

    Returns
    -------
    images : numpy.ndarray
        uint8, shape (N, 28, 28), 0 (background) to 255 (ink).
    labels : numpy.ndarray
        int64, shape (N,), digits 0 to 9.

    Raises
    ------
    DatasetNotFoundError
        Files missing and not downloadable (offline, say); the message says which files to
        put in which folder.
    ChecksumError
        A present file is not the original (with ``verify=True``).
    ValueError
        ``split`` is not "train" or "test"; a file cannot be parsed, or the images and
        labels do not match.
    TypeError
        ``root`` is not a str, an ``os.PathLike`` or None.
    """
    check_choice("split", split, FILES)
    root = resolve_root(root)
    names = FILES[split]
    missing = [name for name in names if not (root / name).is_file()]
    if missing and not download:
        raise DatasetNotFoundError(_not_found_message(root, missing, []))
    for name in missing:
        _download(name, root, missing)
    if verify:
        for name in names:
            if name not in missing:
                _check_sha256(root / name, SHA256[name])

    image_path, label_path = (root / name for name in names)
    images = read_idx(image_path, magic=IMAGE_MAGIC)
    labels = read_idx(label_path, magic=LABEL_MAGIC)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{image_path}: images of shape {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise ValueError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} "
            "labels; the two files must come from the same split"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{label_path}: label {labels.max()} found, expected digits 0 to 9")
    return images, labels.astype(np.int64)


def _urlopen(url, timeout):
    """Open ``url`` for reading; the one place that touches the network (tests replace it)."""
    request = urllib.request.Request(url, headers={"User-Agent": "stn-numpy"})
    return urllib.request.urlopen(request, timeout=timeout)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path, expected):
    found = _sha256(path)
    if found != expected:
        raise ChecksumError(
            f"{path}: SHA-256 {found} differs from the original file's {expected}. The file is "
            "corrupt or not the original MNIST file: delete it and load again to download it, "
            "or pass verify=False to load it as it is"
        )


def _download(name, root, missing):
    """Fetch ``name`` into ``root`` from the first mirror that serves the right bytes."""
    root.mkdir(parents=True, exist_ok=True)
    failures = []
    for mirror in MIRRORS:
        url = mirror + name
        logger.info("downloading %s", url)
        try:
            _fetch(url, root / name, SHA256[name])
            return
        except (OSError, HTTPException, ChecksumError) as err:
            failures.append(f"{url}: {err}")
    raise DatasetNotFoundError(_not_found_message(root, missing, failures))


def _fetch(url, dest, expected):
    """Download ``url`` to ``dest`` atomically: ``dest`` appears only complete and verified."""

    def stream(f):
        digest = hashlib.sha256()
        with _urlopen(url, timeout=TIMEOUT) as response:
            while chunk := response.read(1 << 16):
                digest.update(chunk)
                f.write(chunk)
        found = digest.hexdigest()
        # Raised before atomic_write renames, so bad bytes never take the final name.
        if found != expected:
            raise ChecksumError(f"downloaded bytes have SHA-256 {found}, expected {expected}")

    atomic_write(dest, stream)


def _not_found_message(root, missing, failures):
    lines = [f"MNIST file(s) missing from {root}: {', '.join(missing)}."]
    if failures:
        lines.append("Downloading failed from every mirror:")
        lines.extend(f"  {failure}" for failure in failures)
    lines.append("To work offline, put the four original MNIST files")
    lines.extend(f"  {name}" for pair in FILES.values() for name in pair)
    lines.append(
        f"in {root}, or point the {ENV_VAR} environment variable (or --data-dir on the "
        "command line) at the folder that holds them."
    )
    return "\n".join(lines)
