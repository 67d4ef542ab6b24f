"""Distorted MNIST, as in Jaderberg et al., "Spatial Transformer Networks" (NIPS 2015),
Sec. 4.1 and Appendix A.1.

=========  ======================================================  ============
name       distortion (paper's symbol)                             output H x W
=========  ======================================================  ============
mnist      none, pixels scaled to [0, 1]                           28 x 28
rot        R: rotation, uniform in +-90 deg                        28 x 28
rts        RTS: rotation +-45 deg, scale 0.7-1.2, translation      42 x 42
proj       P: scale 0.75-1.0, corners moved by N(0, 0.1)           28 x 28
elastic    E: scale 0.75-1.0, then a TPS on a jittered 4 x 4 grid  28 x 28
t          T: digit at a random place                              60 x 60
tc         TC: T plus six 6 x 6 crops of other digits as clutter   60 x 60
=========  ======================================================  ============

Every function takes images of shape (N, H, W), uint8 (0 to 255) or floating (0 to 1), and a
``numpy.random.Generator`` from which it draws each image's parameters, so a seed fixes the
dataset; it returns a new float32 array in [0, 1]. The input is never modified. With
``return_params=True`` it returns ``(images, params)`` instead, ``params`` a dict of arrays
holding what was drawn for each image (the angle, scale, translation, corners, control
points or box; see each function), from which the distortion can be measured and undone.
The same generator gives the same images either way.

The warps are inverse maps, as in the paper's sampler: each output (target) pixel
(x_t, y_t) takes the value of the input (source) image at the point (x_s, y_s) it maps to,
read by bilinear interpolation, with zeros outside the input. Coordinates are in pixels,
measured from the image centre, x to the right and y down; a positive angle rotates the
digit counter-clockwise as displayed.
"""

import numpy as np

from .._checks import check_int
from ..grids import tps_grid, tps_lattice
from ..sampling import grid_sample

__all__ = [
    "DATASETS",
    "elastic",
    "output_size",
    "projective",
    "rotate",
    "rts",
    "to_unit",
    "translate",
    "translate_clutter",
]

# Images are warped a few at a time: about 2**16 output pixels per chunk keeps the sampler's
# working set in cache, which measured several times faster than warping thousands at once.
_CHUNK_PIXELS = 1 << 16

# E's control points: the paper's regular 4 x 4 grid (Appendix A.1).
_ELASTIC_LATTICE = (4, 4)


def to_unit(images, rng=None, return_params=False):
    """MNIST unchanged, pixels scaled to [0, 1].

    Parameters
    ----------
    images : numpy.ndarray
        Shape (N, H, W), uint8 (0 to 255) or floating (0 to 1).
    rng : numpy.random.Generator or None
        Unused; accepted so that every ``DATASETS`` entry is called the same way.
    return_params : bool
        Also return the (empty) dict of parameters.

    Returns
    -------
    numpy.ndarray
        float32, shape (N, H, W), in [0, 1].
    """
    images, unit = _check_images(images)
    return _maybe_params(np.multiply(images, unit, dtype=np.float32), {}, return_params)


def rotate(images, rng, max_angle=90.0, return_params=False):
    """R: rotate each digit about the image centre by an angle drawn uniformly in
    [-max_angle, max_angle] degrees (the paper uses 90).

    The inverse map is ``(x_s, y_s) = R(theta)^T (x_t, y_t)``, with
    ``R(theta) = [[cos, sin], [-sin, cos]]`` (counter-clockwise on screen, y pointing down).

    Parameters
    ----------
    images : numpy.ndarray
        Shape (N, H, W), uint8 (0 to 255) or floating (0 to 1).
    rng : numpy.random.Generator
        Source of the angles.
    max_angle : float
        Largest rotation, in degrees.
    return_params : bool
        Also return ``{"angle": (N,)}``, each image's angle in degrees.

    Returns
    -------
    numpy.ndarray
        float32, shape (N, H, W), in [0, 1].
    """
    images, unit = _check_images(images)
    n, h, w = images.shape
    degrees = rng.uniform(-max_angle, max_angle, size=n)
    angle = np.deg2rad(degrees)
    out = _warp(images, _similarity(angle, np.ones(n), np.zeros((n, 2))), (h, w), unit)
    return _maybe_params(out, {"angle": degrees}, return_params)


def rts(images, rng, max_angle=45.0, scale=(0.7, 1.2), canvas=42, return_params=False):
    """RTS: rotate, scale and translate each digit into a larger canvas.

    Paper (Appendix A.1): rotation uniform in +-45 degrees, scale uniform in 0.7 to 1.2, the
    digit placed at a random location in a 42 x 42 image, all uniform. Here the translation
    (t_x, t_y) of the digit's centre from the canvas centre is uniform over the range that
    keeps the scaled H x W frame inside the canvas, ``|t| <= (canvas - s * W) / 2`` (so the
    digit may be cut only where rotation swings the frame's corners out). The inverse map is
    ``(x_s, y_s) = R(theta)^T ((x_t, y_t) - t) / s``.

    Parameters
    ----------
    images : numpy.ndarray
        Shape (N, H, W), uint8 (0 to 255) or floating (0 to 1).
    rng : numpy.random.Generator
        Source of angle, scale and translation.
    max_angle : float
        Largest rotation, in degrees.
    scale : (float, float)
        Range of the scale factor s.
    canvas : int
        Side of the square output.
    return_params : bool
        Also return ``{"angle": (N,), "scale": (N,), "translation": (N, 2)}``: degrees,
        the factor s, and (t_x, t_y) in pixels from the canvas centre.

    Returns
    -------
    numpy.ndarray
        float32, shape (N, canvas, canvas), in [0, 1].
    """
    images, unit = _check_images(images)
    _check_range(scale, "scale")
    n, h, w = images.shape
    canvas = check_int("canvas", canvas, 1)
    degrees = rng.uniform(-max_angle, max_angle, size=n)
    s = rng.uniform(scale[0], scale[1], size=n)
    reach = np.maximum(canvas - s[:, None] * np.array([w, h]), 0) / 2
    t = rng.uniform(-reach, reach)
    out = _warp(images, _similarity(np.deg2rad(degrees), s, t), (canvas, canvas), unit)
    return _maybe_params(out, {"angle": degrees, "scale": s, "translation": t}, return_params)


def projective(images, rng, sigma=0.1, scale=(0.75, 1.0), return_params=False):
    """P: a random projective transformation.

    Paper (Appendix A.1): scale the digit randomly between 0.75 and 1.0, and stretch each
    corner by an amount drawn from a normal distribution with zero mean and standard
    deviation 0.1. In the normalised coordinates the paper uses (the image spans -1 to 1),
    0.1 is a tenth of the half-width: the corner (+-W/2, +-H/2) of the input goes to
    ``s * corner + (W/2, H/2) * eps``, ``eps ~ N(0, sigma^2)`` per coordinate, and the
    homography through these four correspondences (solved for the inverse direction, output
    corners to input corners) gives ``(x_s, y_s, 1) ~ A (x_t, y_t, 1)``.

    Parameters
    ----------
    images : numpy.ndarray
        Shape (N, H, W), uint8 (0 to 255) or floating (0 to 1).
    rng : numpy.random.Generator
        Source of scales and corner displacements.
    sigma : float
        Standard deviation of the corner displacement, in half-widths.
    scale : (float, float)
        Range of the scale factor s.
    return_params : bool
        Also return ``{"scale": (N,), "corners": (N, 4, 2)}``: s, and where the input's
        corners (top-left, top-right, bottom-right, bottom-left) land, (x, y) in pixels
        from the image centre.

    Returns
    -------
    numpy.ndarray
        float32, shape (N, H, W), in [0, 1].
    """
    images, unit = _check_images(images)
    _check_range(scale, "scale")
    n, h, w = images.shape
    half = np.array([w / 2, h / 2])
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    s = rng.uniform(scale[0], scale[1], size=n)
    moved = s[:, None, None] * corners + half * rng.normal(0.0, sigma, size=(n, 4, 2))
    out = _warp(images, _homography(moved, corners), (h, w), unit)
    return _maybe_params(out, {"scale": s, "corners": moved}, return_params)


def elastic(images, rng, sigma=0.1, scale=(0.75, 1.0), return_params=False):
    """E: scale the digit, then warp it with a thin-plate spline through randomly moved
    control points.

    Paper (Appendix A.1): the digit is scaled randomly between 0.75 and 1.0, then warped by
    a thin-plate spline whose 16 control points, on a regular 4 x 4 grid, are randomly
    perturbed. Not from the paper: the perturbation's distribution and size, which are this
    project's choice (below).

    Here the control points ``c_k`` are :func:`stn_numpy.grids.tps_lattice` ``(4, 4)``, which
    spans the image from edge to edge in the paper's normalised coordinates (-1 to 1). Each
    moves by ``eps_k ~ N(0, sigma^2)`` per coordinate, on the scaled digit, so the inverse
    map is ``(x_s, y_s) = T(x_t, y_t) / s`` with T the spline taking ``c_k`` to
    ``c_k + eps_k``. A thin-plate spline reproduces affine maps exactly, so the scaling
    moves into the control points: one :func:`stn_numpy.grids.tps_grid` per image, with
    ``theta_k = (c_k + eps_k) / s``. With ``sigma = 0`` and ``s = 1`` the warp is the
    identity.

    ``sigma = 0.1`` takes the corner noise of P, N(0, 0.1) in the same normalised units
    (Appendix A.1): 1.4 pixels standard deviation at a control point of a 28-pixel digit,
    about the size of Simard et al.'s elastic distortion for MNIST ("Best practices for
    convolutional neural networks applied to visual document analysis", ICDAR 2003:
    alpha = 34, sigma = 4 give displacements of 1.4 pixels standard deviation). Folds are
    rare at this size: over 20000 draws (s = 1), 1 warp in 400 folds the plane somewhere in
    the frame (the spline's Jacobian determinant turns negative), 1 in 1000 inside the
    central 20 x 20 pixels where MNIST digits lie.

    Parameters
    ----------
    images : numpy.ndarray
        Shape (N, H, W), uint8 (0 to 255) or floating (0 to 1).
    rng : numpy.random.Generator
        Source of scales and control-point displacements.
    sigma : float
        Standard deviation of each control point's displacement, per coordinate, in
        half-widths (half-heights for y).
    scale : (float, float)
        Range of the scale factor s.
    return_params : bool
        Also return ``{"scale": (N,), "control_points": (N, 16, 2)}``: s, and the moved
        control points ``c_k + eps_k`` in normalised coordinates.

    Returns
    -------
    numpy.ndarray
        float32, shape (N, H, W), in [0, 1].
    """
    images, unit = _check_images(images)
    _check_range(scale, "scale")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    n, h, w = images.shape
    s = rng.uniform(scale[0], scale[1], size=n)
    lattice = tps_lattice(_ELASTIC_LATTICE)
    moved = lattice + rng.normal(0.0, sigma, size=(n, *lattice.shape))
    theta = moved / s[:, None, None]

    def source_grid(start, stop):
        return tps_grid(theta[start:stop], (stop - start, 1, h, w), lattice=_ELASTIC_LATTICE)

    out = _resample(images, source_grid, (h, w), unit)
    return _maybe_params(out, {"scale": s, "control_points": moved}, return_params)


def translate_clutter(images, rng, canvas=60, n_clutter=6, patch=6, clutter_images=None,
                      return_params=False):
    """T / TC: place each digit at a random location in a larger canvas, among clutter.

    Paper (Appendix A.1): the digit goes at a random location in a 60 x 60 black canvas, and
    six randomly sampled 6 x 6 patches of other digit images go at random locations. Here
    every choice is uniform and in whole pixels (so no interpolation): the digit's top-left
    corner, each patch's source image (never the digit's own image when the clutter comes
    from ``images``), its crop position inside that image and its place in the canvas. As in
    DeepMind's cluttered-MNIST generator, digit and patches are added and the sum clipped
    at 1, so clutter may overlap the digit.

    Parameters
    ----------
    images : numpy.ndarray
        Shape (N, H, W), uint8 (0 to 255) or floating (0 to 1).
    rng : numpy.random.Generator
        Source of positions and patches.
    canvas : int
        Side of the square output.
    n_clutter : int
        Patches per image; 0 gives T.
    patch : int
        Side of a square patch.
    clutter_images : numpy.ndarray or None
        Images to crop patches from, shape (M, H', W'), uint8 or floating like ``images``;
        None takes them from ``images`` itself (other digits than the one placed).
    return_params : bool
        Also return ``{"box": (N, 4)}``, the digit's box in the canvas as
        (top, left, height, width) in pixels.

    Returns
    -------
    numpy.ndarray
        float32, shape (N, canvas, canvas), in [0, 1].
    """
    images, unit = _check_images(images)
    n, h, w = images.shape
    canvas = check_int("canvas", canvas, 1)
    n_clutter = check_int("n_clutter", n_clutter)
    patch = check_int("patch", patch, 1)
    if canvas < max(h, w):
        raise ValueError(f"canvas must be at least the image size {max(h, w)}, got {canvas}")
    others = clutter_images is None
    if others:
        source, source_unit = images, unit
        if n_clutter and n < 2:
            raise ValueError("clutter from other digits needs at least 2 images, got 1")
    else:
        source, source_unit = _check_images(clutter_images, "clutter_images")
    if not 1 <= patch <= min(source.shape[1:]):
        raise ValueError(f"patch must be in 1..{min(source.shape[1:])}, got {patch}")

    corner = rng.integers(0, [canvas - h + 1, canvas - w + 1], size=(n, 2))
    if others:
        # Drawing from n - 1 and stepping over the digit's own index excludes it uniformly.
        pick = rng.integers(0, n - 1, size=(n, n_clutter))
        pick += pick >= np.arange(n)[:, None]
    else:
        pick = rng.integers(0, len(source), size=(n, n_clutter))
    crop = rng.integers(0, np.array(source.shape[1:]) - patch + 1, size=(n, n_clutter, 2))
    place = rng.integers(0, canvas - patch + 1, size=(n, n_clutter, 2))

    out = np.zeros((n, canvas, canvas), np.float32)
    rows, cols = np.arange(h)[:, None], np.arange(w)
    patch_rows, patch_cols = np.arange(patch)[:, None], np.arange(patch)
    step = max(1, 4 * _CHUNK_PIXELS // canvas**2)
    for start in range(0, n, step):
        k = np.arange(start, min(start + step, n))[:, None, None]
        out[k, corner[k, 0] + rows, corner[k, 1] + cols] = images[k[:, 0, 0]] * unit
        for c in range(n_clutter):
            crop_r, crop_c = crop[k, c, 0] + patch_rows, crop[k, c, 1] + patch_cols
            place_r, place_c = place[k, c, 0] + patch_rows, place[k, c, 1] + patch_cols
            out[k, place_r, place_c] += source[pick[k, c], crop_r, crop_c] * source_unit
    np.clip(out, 0.0, 1.0, out=out)
    box = np.concatenate([corner, np.broadcast_to([h, w], (n, 2))], axis=1)
    return _maybe_params(out, {"box": box}, return_params)


def translate(images, rng, canvas=60, return_params=False):
    """T: each digit at a random location in a larger canvas, no clutter.

    ``translate_clutter`` with ``n_clutter=0``; see there.
    """
    return translate_clutter(images, rng, canvas=canvas, n_clutter=0,
                             return_params=return_params)


DATASETS = {
    "mnist": to_unit,
    "rot": rotate,
    "rts": rts,
    "proj": projective,
    "elastic": elastic,
    "t": translate,
    "tc": translate_clutter,
}

_OUTPUT_SIZES = {
    "mnist": (28, 28),
    "rot": (28, 28),
    "rts": (42, 42),
    "proj": (28, 28),
    "elastic": (28, 28),
    "t": (60, 60),
    "tc": (60, 60),
}


def output_size(name):
    """(H, W) of the images ``DATASETS[name]`` makes from 28 x 28 MNIST digits."""
    if name not in _OUTPUT_SIZES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return _OUTPUT_SIZES[name]


def _maybe_params(out, params, return_params):
    return (out, params) if return_params else out


def _check_images(images, name="images"):
    """Validate ``images``; return them with the factor that takes their values to [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got shape {images.shape}")
    if images.dtype == np.uint8:
        return images, 1 / 255
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"{name} must be uint8 (0-255) or floating (0-1), got {images.dtype}")
    if images.size and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"floating {name} must lie in [0, 1], got values in "
            f"[{images.min()}, {images.max()}]; divide uint8 pixels by 255"
        )
    return images, 1.0


def _check_range(bounds, name):
    low, high = bounds
    if not 0 < low <= high:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {bounds}")


def _similarity(angle, s, t):
    """Inverse maps (N, 3, 3) of x -> s R(angle) x + t, in centred coordinates."""
    cos, sin = np.cos(angle) / s, np.sin(angle) / s
    maps = np.zeros((len(s), 3, 3))
    maps[:, 0, 0], maps[:, 0, 1] = cos, -sin
    maps[:, 1, 0], maps[:, 1, 1] = sin, cos
    maps[:, :2, 2] = -np.einsum("nij,nj->ni", maps[:, :2, :2], t)
    maps[:, 2, 2] = 1.0
    return maps


def _homography(src, dst):
    """Homographies (N, 3, 3) taking each src (N, 4, 2) onto dst (4, 2), as
    ``(u, v, 1) ~ A (x, y, 1)`` with ``A[2, 2] = 1``: the 8 x 8 direct linear system."""
    n = len(src)
    x, y = src[..., 0], src[..., 1]
    u, v = np.broadcast_to(dst[..., 0], x.shape), np.broadcast_to(dst[..., 1], x.shape)
    one, zero = np.ones_like(x), np.zeros_like(x)
    rows_u = np.stack([x, y, one, zero, zero, zero, -u * x, -u * y], axis=-1)
    rows_v = np.stack([zero, zero, zero, x, y, one, -v * x, -v * y], axis=-1)
    a = np.concatenate([rows_u, rows_v], axis=1)
    b = np.concatenate([u, v], axis=1)
    coeffs = np.linalg.solve(a, b[..., None])[..., 0]
    return np.concatenate([coeffs, np.ones((n, 1))], axis=1).reshape(n, 3, 3)


def _centring(h, w):
    """Pixel indices (col, row, 1) -> coordinates about the image centre."""
    return np.array([[1.0, 0.0, -(w - 1) / 2], [0.0, 1.0, -(h - 1) / 2], [0.0, 0.0, 1.0]])


def _warp(images, maps, out_shape, unit):
    """Sample ``images`` (N, h, w) through ``maps`` (N, 3, 3) onto an ``out_shape`` grid.

    ``maps`` take centred output coordinates (x_t, y_t, 1) to homogeneous centred input
    coordinates. Values are multiplied by ``unit``.
    """
    _, h, w = images.shape
    out_h, out_w = out_shape
    maps = np.linalg.inv(_centring(h, w)) @ maps @ _centring(out_h, out_w)
    rows, cols = np.mgrid[0:out_h, 0:out_w]
    grid = np.stack([cols.ravel(), rows.ravel(), np.ones(out_h * out_w)])

    def source_grid(start, stop):
        points = maps[start:stop] @ grid
        x_s = (points[:, 0] / points[:, 2]).reshape(-1, out_h, out_w)
        y_s = (points[:, 1] / points[:, 2]).reshape(-1, out_h, out_w)
        # grid_sample's normalised coordinates (align_corners=False) put pixel centres at
        # (2 i + 1) / size - 1.
        return np.stack([(2 * x_s + 1) / w - 1, (2 * y_s + 1) / h - 1], axis=-1)

    return _resample(images, source_grid, out_shape, unit)


def _resample(images, source_grid, out_shape, unit):
    """Sample ``images`` (N, h, w) a chunk at a time, values multiplied by ``unit``.

    ``source_grid(start, stop)`` returns the source points of images ``start:stop``, shape
    (stop - start, H, W, 2), in grid_sample's normalised coordinates (align_corners=False).
    The sampler is the paper's bilinear kernel (Eq. 5) with zeros outside, ``grid_sample``.
    """
    n = len(images)
    out_h, out_w = out_shape
    out = np.empty((n, out_h, out_w), np.float32)
    step = max(1, _CHUNK_PIXELS // (out_h * out_w))
    for start in range(0, n, step):
        stop = min(start + step, n)
        chunk = images[start:stop, None].astype(np.float64)
        out[start:stop] = grid_sample(chunk, source_grid(start, stop), padding_mode="zeros")[:, 0]
    out *= unit
    return np.clip(out, 0.0, 1.0, out=out)
