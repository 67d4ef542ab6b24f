"""Test sets made elsewhere, as ``.npz`` files, for ``stn-numpy evaluate --data FILE.npz``.

The format: an ``np.savez`` archive (no pickled objects) with two arrays,

* ``x`` -- the images, shape (N, H, W), any float dtype, finite values in [0, 1]
  (black background 0, ink 1, as MNIST divided by 255);
* ``y`` -- the labels, shape (N,), any integer dtype, values 0 to 9.

Other arrays in the file are ignored. For example::

    np.savez("mine.npz", x=images.astype(np.float32) / 255, y=labels)
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .._io import open_regular, read_npy_header

__all__ = ["load_npz"]


def load_npz(path, input_size=None) -> tuple[np.ndarray, np.ndarray]:
    """Read a test set; returns ``x`` as float32 ``(N, 1, H, W)`` and ``y`` as int64 ``(N,)``.

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file, in the format of this module's docstring.
    input_size : (H, W) or None
        The size a model expects; images of another size are refused.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        Not an ``.npz`` archive, a missing ``x`` or ``y``, wrong shapes, dtypes or values;
        the message names the file, the array and what was expected.
    """
    path = Path(path)
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    with f:
        if f.read(6) == b"\x93NUMPY":
            raise ValueError(f"{path} holds a single array, not an .npz archive of x and y")
        f.seek(0)
        try:
            z = zipfile.ZipFile(f)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path} is not a readable .npz archive ({e})") from e
        with z:
            names = {info.filename.removesuffix(".npy"): info for info in z.infolist()}
            missing = [k for k in ("x", "y") if k not in names]
            if missing:
                raise ValueError(f"{path} lacks the array(s) {missing} (it holds "
                                 f"{sorted(names)}); expected x (N, H, W) float in [0, 1] "
                                 f"and y (N,) integer labels")
            arrays = {}
            for key in ("x", "y"):
                # The header's declared size is checked against the member's before any
                # of it is allocated.
                try:
                    read_npy_header(z, names[key])
                    with z.open(names[key]) as member:
                        arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
                except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
                    raise ValueError(f"{path}: {key} is not a readable array ({e})") from e
    x, y = arrays["x"], arrays["y"]
    if not np.issubdtype(x.dtype, np.floating) or x.ndim != 3:
        raise ValueError(f"{path}: x must be float images of shape (N, H, W), "
                         f"got dtype {x.dtype}, shape {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
        raise ValueError(f"{path}: y must be integer labels of shape ({len(x)},), "
                         f"got dtype {y.dtype}, shape {y.shape}")
    if not len(x):
        raise ValueError(f"{path}: x holds no images")
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: x must hold finite values in [0, 1], got "
                         f"{x.size - np.count_nonzero(np.isfinite(x))} NaN or infinite")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"{path}: x must hold finite values in [0, 1], got values in "
                         f"[{x.min()}, {x.max()}]; divide 0-255 images by 255")
    if y.min() < 0 or y.max() > 9:
        raise ValueError(f"{path}: y must hold labels 0 to 9, got values in "
                         f"[{y.min()}, {y.max()}]")
    if input_size is not None and x.shape[1:] != tuple(input_size):
        raise ValueError(f"{path}: x has images of {x.shape[1]}x{x.shape[2]}, the model "
                         f"expects {input_size[0]}x{input_size[1]}")
    return x[:, None].astype(np.float32), y.astype(np.int64)
