"""What a trained spatial transformer does to distorted digits, measured against the
distortion it was shown.

Every measure reads the affine parameters ``theta`` (N, 2, 3) the localisation net predicts
(an ``attention`` head's (s, t_x, t_y) is the affine ``[[s, 0, t_x], [0, s, t_y]]``, a
``similarity`` head's (a, log s, t_x, t_y) is ``s R(a)`` beside ``t``) and the
parameters the generator drew for each image (:mod:`stn_numpy.data.distort`,
``return_params=True``). ``theta`` maps the output grid (x_t, y_t) to input points
(x_s, y_s) = A (x_t, y_t) + b in normalised coordinates (Jaderberg et al. 2015, eq. 1):

* **rotation** (``rot``, ``rts``): the angle of A's rotational part,
  ``phi = atan2(A_10 - A_01, A_00 + A_11)``, in degrees and in the generator's convention
  (positive turns the digit counter-clockwise on screen). The generator's inverse map for
  an angle ``a`` is ``R(a)^T``; a transformer that undoes it predicts ``A = R(a)``, whose
  angle is ``-a`` (the generator's ``R(a) = [[cos, sin], [-sin, cos]]`` is the notebooks'
  grid of angle ``-a``: a positive grid angle turns the grid clockwise on screen and the
  content counter-clockwise). Fitted against the applied angle, a slope of -1 undoes every rotation,
  0 none. A ``similarity`` head's rotation is its angle parameter itself, in degrees and
  not wrapped into (-180, 180], so a head that turns past a half-turn shows as such.
* **scale** (``rts``): the output window's side measured in digit frames,
  ``sqrt(|det A|) * W / digit``, against the applied scale; a window that grows with the
  digit gives a positive slope and R^2 near 1.
* **translation** (``rts``): the window's centre ``b`` in pixels from the canvas centre,
  against the digit's offset ``t`` (both coordinates pooled); slope 1 follows the digit.
* **ink inside** (``t``, ``tc``): the fraction of the clean digit's ink (its pixel values,
  placed in its box) whose pixel centres fall inside the output window, the image of the
  square ``[-1, 1]^2`` under the affine map; 1 means no stroke is cut off.
"""

from __future__ import annotations

import numpy as np

from ._checks import check_float_array
from .grids import similarity_affine

__all__ = ["MEASURABLE", "MEASURED", "affine_theta", "format_measures", "ink_inside", "linear_fit",
           "rotation_angle", "scale_translation", "transformer_measures", "transformer_params",
           "transformer_theta"]

# the heads whose parameters give one affine matrix, and so can be measured
MEASURABLE = ("affine", "attention", "similarity")
# datasets -> the measures that apply to them
MEASURED = {"rot": ("rotation",), "rts": ("rotation", "scale", "translation"),
            "t": ("ink_inside",), "tc": ("ink_inside",)}


def affine_theta(theta: np.ndarray, transform: str) -> np.ndarray:
    """The affine matrix ``(N, 2, 3)`` of an ``affine``, ``attention`` or ``similarity`` head.

    ``theta`` is the head's output, flat ``(N, P)`` or in the generator's shape; other
    transforms have no single affine matrix and raise ``ValueError``.
    """
    theta = np.asarray(theta, dtype=np.float64)
    if transform == "affine":
        return theta.reshape(len(theta), 2, 3)
    if transform == "attention":
        s, tx, ty = theta.reshape(len(theta), 3).T
        zero = np.zeros_like(s)
        return np.stack([np.stack([s, zero, tx], -1), np.stack([zero, s, ty], -1)], axis=1)
    if transform == "similarity":
        return similarity_affine(theta.reshape(len(theta), 4))
    raise ValueError(f"transform must be 'affine', 'attention' or 'similarity' to be "
                     f"measured, got {transform!r}")


def rotation_angle(theta: np.ndarray) -> np.ndarray:
    """The rotation ``phi = atan2(A_10 - A_01, A_00 + A_11)`` of affine ``theta``, degrees.

    Parameters
    ----------
    theta : ndarray, shape (N, 2, 3)

    Returns
    -------
    ndarray, shape (N,), in (-180, 180]: the grid angle. For ``A = s R(a)`` with
    ``R(a) = [[cos a, -sin a], [sin a, cos a]]`` and any scale ``s > 0`` it is ``a``: the
    grid turned clockwise on screen (y down) by ``a``, V showing U's content turned
    counter-clockwise by ``a``. A transformer undoes a distortion by the grid ``R(alpha)``
    when this angle is ``-alpha``.
    """
    theta = check_float_array("theta", np.asarray(theta, dtype=np.float64), shape=(None, 2, 3))
    return np.rad2deg(np.arctan2(theta[:, 1, 0] - theta[:, 0, 1],
                                 theta[:, 0, 0] + theta[:, 1, 1]))


def scale_translation(theta: np.ndarray, size, digit: int = 28, align_corners=False):
    """The output window's side (in digit frames) and centre (pixels) in an input of ``size``.

    Parameters
    ----------
    theta : ndarray, shape (N, 2, 3)
    size : (H, W)
        The input's size.
    digit : int
        The side of an undistorted digit frame, in pixels.
    align_corners : bool
        The transformer's convention: +-1 are the corner pixels' centres (True) or the
        image's outer edges (False).

    Returns
    -------
    scale : ndarray, shape (N,)
        ``sqrt(|det A|) * W / digit``.
    translation : ndarray, shape (N, 2)
        ``b * (W, H) / 2`` (``(W - 1, H - 1) / 2`` with ``align_corners``): the window's
        centre in pixels from the input's centre, x to the right and y down.
    """
    theta = check_float_array("theta", np.asarray(theta, dtype=np.float64), shape=(None, 2, 3))
    H, W = size
    half = (np.array([W, H]) - bool(align_corners)) / 2
    scale = np.sqrt(np.abs(np.linalg.det(theta[:, :, :2]))) * W / digit
    return scale, theta[:, :, 2] * half


def ink_inside(theta: np.ndarray, digits: np.ndarray, box: np.ndarray, size,
               align_corners=False) -> np.ndarray:
    """Fraction of each digit's ink whose pixel centres lie inside the output window.

    Parameters
    ----------
    theta : ndarray, shape (N, 2, 3)
    digits : ndarray, shape (N, h, w)
        The clean digits, values in ``[0, 1]`` (the ink weights).
    box : ndarray, shape (N, 4)
        Each digit's (top, left, height, width) in the canvas, pixels.
    size : (H, W)
        The canvas size.
    align_corners : bool
        The transformer's convention, as in :func:`scale_translation`.

    Returns
    -------
    ndarray, shape (N,), in [0, 1]: ``sum(ink * inside) / sum(ink)`` where a pixel centre
    ``p`` is inside when ``A^-1 (p - b)`` lies in ``[-1, 1]^2``; 1 for a digit without ink.
    A singular ``A`` (a window of zero area) holds no ink.
    """
    theta = check_float_array("theta", np.asarray(theta, dtype=np.float64), shape=(None, 2, 3))
    digits = np.asarray(digits, dtype=np.float64)
    box = np.asarray(box)
    n, h, w = digits.shape
    H, W = size
    rows = box[:, 0, None, None] + np.arange(h)[:, None]
    cols = box[:, 1, None, None] + np.arange(w)
    if align_corners:
        x, y = 2 * cols / (W - 1) - 1, 2 * rows / (H - 1) - 1
    else:
        x, y = (2 * cols + 1) / W - 1, (2 * rows + 1) / H - 1
    points = np.stack(np.broadcast_arrays(x, y), axis=-1).reshape(n, -1, 2)
    A, b = theta[:, :, :2], theta[:, :, 2]
    det = np.linalg.det(A)
    regular = np.abs(det) > 1e-12
    inside = np.zeros(points.shape[:2], dtype=bool)
    if regular.any():
        inv = np.linalg.inv(A[regular])
        local = np.einsum("nij,nkj->nki", inv, points[regular] - b[regular, None])
        inside[regular] = np.all(np.abs(local) <= 1, axis=-1)
    ink = digits.reshape(n, -1)
    total = ink.sum(axis=1)
    kept = (ink * inside).sum(axis=1)
    return np.where(total > 0, kept / np.where(total > 0, total, 1), 1.0)


def linear_fit(x, y) -> dict:
    """Least-squares line ``y ~ slope * x + intercept`` and its R^2.

    Returns ``{"slope", "intercept", "r2", "n"}``. ``R^2 = 1 - SS_res / SS_tot``, 1 when
    ``y`` is constant (the line ``y = intercept`` fits it exactly). ``x`` must vary.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same size, got {x.size} and {y.size}")
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError("x must hold at least two different values to fit a line")
    dx, dy = x - x.mean(), y - y.mean()
    slope = float(dx @ dy / (dx @ dx))
    intercept = float(y.mean() - slope * x.mean())
    ss_res = float(np.sum((dy - slope * dx) ** 2))
    ss_tot = float(dy @ dy)
    r2 = 1.0 if ss_tot == 0 else 1.0 - ss_res / ss_tot
    return {"slope": slope, "intercept": intercept, "r2": r2, "n": int(x.size)}


def transformer_params(model, X, batch_size: int | None = None) -> np.ndarray:
    """The flat parameters ``(N, P)`` the model's localisation net predicts for images ``X``."""
    st = model.transformer
    if st is None:
        raise ValueError(f"model {model.config['arch']!r} has no spatial transformer")
    return model._batched(lambda x: st.localization.forward(x, train=False), X, batch_size)


def transformer_theta(model, X, batch_size: int | None = None) -> np.ndarray:
    """The affine ``theta`` ``(N, 2, 3)`` the model's transformer predicts for images ``X``."""
    return affine_theta(transformer_params(model, X, batch_size), model.transformer.transform)


def transformer_measures(model, X, params: dict, dataset: str) -> dict:
    """The measures of this module that apply to ``dataset``, for ``model`` on ``X``.

    Parameters
    ----------
    model : Model
        A model with an ``affine``, ``attention`` or ``similarity`` transformer.
    X : ndarray, shape (N, 1, H, W)
        Test images of ``dataset``.
    params : dict
        Their distortion parameters, as ``load_split(..., return_params=True)`` gives them.
    dataset : str

    Returns
    -------
    dict
        Empty when nothing applies (other datasets or heads). Otherwise some of
        ``"rotation"``, ``"scale"``, ``"translation"`` (each :func:`linear_fit` of recovered
        against applied, plus ``"applied"`` and ``"recovered"`` arrays) and
        ``"ink_inside"`` (``{"mean", "min", "values"}``).
    """
    st = model.transformer
    if st is None or st.transform not in MEASURABLE or dataset not in MEASURED:
        return {}
    flat = transformer_params(model, X)
    theta = affine_theta(flat, st.transform)
    size = X.shape[2:]
    out = {}
    for name in MEASURED[dataset]:
        if name == "rotation":
            recovered = (np.rad2deg(flat[:, 0].astype(np.float64))
                         if st.transform == "similarity" else rotation_angle(theta))
            applied = params["angle"]
        elif name == "ink_inside":
            values = ink_inside(theta, params["digits"], params["box"], size, st.align_corners)
            out[name] = {"mean": float(values.mean()), "min": float(values.min()),
                         "values": values}
            continue
        else:
            scale, shift = scale_translation(theta, size, params["digits"].shape[-1],
                                             st.align_corners)
            applied, recovered = ((params["scale"], scale) if name == "scale"
                                  else (params["translation"], shift))
        out[name] = {**linear_fit(applied, recovered), "applied": np.asarray(applied),
                     "recovered": recovered}
    return out


def format_measures(measures: dict) -> list[str]:
    """One line of text per measure, as ``stn-numpy evaluate`` prints them."""
    lines = []
    for name, m in measures.items():
        if name == "ink_inside":
            lines.append(f"ink inside the transformer's window: mean {m['mean']:.3f}, "
                         f"min {m['min']:.3f}")
        else:
            lines.append(f"{name}: recovered vs applied slope {m['slope']:+.3f}, "
                         f"intercept {m['intercept']:+.3f}, R^2 {m['r2']:.3f} "
                         f"({m['n']} values)")
    return lines
