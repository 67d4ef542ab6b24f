"""Checkers for the exercises of notebooks 01-03: each takes the function a learner wrote.

A lesson gives a stub (a function with its docstring that raises ``NotImplementedError``)
and, in the next cell, calls the matching ``check_*`` on it. The checker compares the
learner's function with the package (``stn_numpy.reference``, ``stn_numpy.grids``,
``stn_numpy.layers``) and with central differences (``stn_numpy.gradcheck``), on fixed
seeds, and prints one relative error per comparison:

* a stub not filled in yet prints that it is not written (``NOT_WRITTEN``), so a lesson runs
  to its end (and the test suite passes) before the learner has written anything;
* a function that passes every comparison prints ``passed``;
* a wrong function raises ``AssertionError`` naming the comparison that failed, with a hint
  where the mistake is a common one.

``notebooks/solutions.ipynb`` holds a solution for every exercise, each run through its
checker; ``tests/test_exercises.py`` runs them too, and checks that wrong solutions fail.

Pixel coordinates (exercises of notebook 01): ``x`` is a column, ``y`` a row, pixel ``(y, x)``
has its centre at the integers; these are the coordinates the sampler works in once the
grid's normalized ``x_s`` is unnormalized.
"""

from __future__ import annotations

import numpy as np

import stn_numpy as stn
from stn_numpy.gradcheck import numerical_gradient, rel_error
from stn_numpy.layers import MaxPool2d, cross_entropy

NOT_WRITTEN = "not written yet: fill in the stub above, run its cell, then run this one again"


def _run(name, fn, comparisons):
    """Print each comparison of ``fn``; raise AssertionError on the first one that fails.

    ``comparisons(fn)`` yields ``(label, error, threshold, hint)``; the error is computed
    lazily, so a stub's NotImplementedError surfaces on the first comparison.
    """
    try:
        for label, error, threshold, hint in comparisons(fn):
            print(f"{name}: {label:44s} rel error {error:.1e}")
            if not error < threshold:
                message = f"{name}: {label}: rel error {error:.1e}, expected below {threshold:.0e}"
                raise AssertionError(message + (f". Hint: {hint}" if hint else ""))
    except NotImplementedError:
        print(f"{name}: {NOT_WRITTEN}")
        return
    except AssertionError as err:
        if str(err).startswith(f"{name}: "):
            raise
        raise AssertionError(f"{name}: {err}") from None
    print(f"{name}: passed")


def _err(mine, ref):
    """rel_error of ``mine`` against ``ref``, after checking that the shapes agree."""
    if mine is None:
        raise AssertionError("returned None: is the return statement missing?")
    mine = np.asarray(mine, dtype=float)
    if mine.shape != np.shape(ref):
        raise AssertionError(f"returned an array of shape {mine.shape}, expected {np.shape(ref)}")
    return rel_error(mine, ref)


# ---- pixel-coordinate test cases shared by the sampler exercises ---------------------------
# Coordinates are multiples of 1/16 and the images 5 x 9 (align_corners=True scales 2 and 4),
# so pixel -> normalized -> pixel is exact: the reference reads the very same points, integer
# ones included, and takes the same side of every kink.
_H, _W = 5, 9


def _dyadic_points(rng, P, margin=1.5):
    x = np.round(rng.uniform(-margin, _W - 1 + margin, P) * 16) / 16
    y = np.round(rng.uniform(-margin, _H - 1 + margin, P) * 16) / 16
    return x, y


def _to_grid(x, y, W=_W, H=_H):
    """Pixel points (P,) -> a normalized (1, 1, P, 2) grid for align_corners=True."""
    return np.stack([x / ((W - 1) / 2) - 1, y / ((H - 1) / 2) - 1], -1)[None, None]


def _reference(U, x, y, dV=None, padding_mode="zeros"):
    """The reference sampler at pixel points: V (C, P), or with dV (dU, dgrid in pixels)."""
    grid = _to_grid(x, y, U.shape[2], U.shape[1])
    opts = dict(padding_mode=padding_mode, align_corners=True)
    if dV is None:
        return stn.reference.grid_sample(U[None], grid, **opts)[0, :, 0]
    dU, dgrid = stn.reference.grid_sample_backward(dV[None, :, None], U[None], grid, **opts)
    scale = np.array([(U.shape[2] - 1) / 2, (U.shape[1] - 1) / 2])
    return dU[0], dgrid[0, 0] / scale  # dgrid back in pixel units


def _sampler_case(seed, P=60):
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(3, _H, _W))
    x, y = _dyadic_points(rng, P)
    x[:4], y[:4] = [0, 3, _W - 1, 2], [0, 2, 1, _H - 1]  # pixel centres, on the kinks
    return U, x, y, rng.normal(size=(3, P))


def _off_kink_case(seed, P=20):
    # Random points inside the image, away from the integers: central differences apply.
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(2, 4, 6))
    x = rng.integers(0, 5, P) + rng.uniform(0.1, 0.9, P)
    y = rng.integers(0, 3, P) + rng.uniform(0.1, 0.9, P)
    return U, x, y, rng.normal(size=(2, P))


# ---- notebook 01 --------------------------------------------------------------------------
def check_bilinear_forward(bilinear_forward):
    """``bilinear_forward(U, x, y) -> V``: U (C, H, W), points (P,) in pixels, V (C, P)."""
    def comparisons(fn):
        U, x, y, _ = _sampler_case(1)
        inside = (x > 0) & (x < _W - 1) & (y > 0) & (y < _H - 1)
        xi, yi = x[inside], y[inside]
        yield "V vs the reference, points inside the image", \
            _err(fn(U, xi, yi), _reference(U, xi, yi)), 1e-12, \
            "wa = (x1 - x)(y1 - y) multiplies Ia = U[:, y0, x0] (each weight is the area " \
            "opposite its corner); x picks the column, y the row"
        yield "V vs the reference, points outside too", _err(fn(U, x, y), _reference(U, x, y)), \
            1e-12, "a corner outside the image reads 0: mask it (NumPy wraps a negative index " \
            "round to the other side of the image)"
    _run("bilinear_forward", bilinear_forward, comparisons)


def check_bilinear_backward_dU(bilinear_backward_dU):
    """``bilinear_backward_dU(dV, U_shape, x, y) -> dU`` (C, H, W): eq. (6) as a scatter."""
    def comparisons(fn):
        U, x, y, dV = _sampler_case(2, P=400)  # 400 points on 45 pixels: many repeats
        dU_ref, _ = _reference(U, x, y, dV)
        yield "dU vs stn.reference.grid_sample_backward", _err(fn(dV, U.shape, x, y), dU_ref),\
            1e-12, "several points read the same pixel: add with np.add.at, not dU[idx] +=; " \
            "corners outside the image receive nothing"
        U, x, y, dV = _off_kink_case(3)
        num = numerical_gradient(lambda u: _reference(u, x, y), U.copy(), df=dV)
        yield "dU vs central differences", _err(fn(dV, U.shape, x, y), num), 1e-8, None
    _run("bilinear_backward_dU", bilinear_backward_dU, comparisons)


def check_bilinear_dxy(bilinear_dxy):
    """``bilinear_dxy(dV, U, x, y) -> (dx, dy)``, each (P,): dL/dx and dL/dy in pixel units."""
    def comparisons(fn):
        U, x, y, dV = _off_kink_case(4)
        dx, dy = fn(dV, U, x, y)
        num_x = numerical_gradient(lambda v: _reference(U, v, y), x.copy(), df=dV)
        num_y = numerical_gradient(lambda v: _reference(U, x, v), y.copy(), df=dV)
        yield "dx, dy vs central differences (off the kinks)", \
            max(_err(dx, num_x), _err(dy, num_y)), 1e-8, \
            "a column difference interpolated along y (and a row difference along x)"
        U, x, y, dV = _sampler_case(5)
        dx, dy = fn(dV, U, x, y)
        _, d_ref = _reference(U, x, y, dV)
        yield "dx, dy vs stn.reference, integers included", \
            max(_err(dx, d_ref[:, 0]), _err(dy, d_ref[:, 1])), 1e-12, \
            "at an integer x the floor form takes the pixels x and x + 1 (eq. 7 as printed " \
            "does not); outside the image U reads 0"
    _run("bilinear_dxy", bilinear_dxy, comparisons)


def check_affine_grid_backward(affine_grid_backward):
    """``affine_grid_backward(dgrid, theta, size, align_corners) -> dtheta`` (N, 2, 3)."""
    def comparisons(fn):
        rng = np.random.default_rng(6)
        size = (2, 3, 4, 7)
        for ac in (False, True):
            theta = rng.normal(size=(2, 2, 3))
            dgrid = rng.normal(size=(2, 4, 7, 2))
            mine = fn(dgrid, theta, size, ac)
            yield f"dtheta vs stn.affine_grid_backward, ac={ac!s:5}", \
                _err(mine, stn.affine_grid_backward(dgrid, theta, size, ac)), 1e-12, \
                "dtheta = sum over points of dL/ds_i (x_t, y_t, 1); use stn.target_coordinates" \
                + ("(H, W, align_corners): the target points move with align_corners" if ac else "")
            num = numerical_gradient(lambda th, ac=ac: stn.affine_grid(th, size, ac), theta,
                                     df=dgrid)
            yield f"dtheta vs central differences, ac={ac!s:5}", _err(mine, num), 1e-8, None
    _run("affine_grid_backward", affine_grid_backward, comparisons)


def check_border_pad(border_pad):
    """``border_pad(x, W) -> (x_padded, dxpadded_dx)``: border padding of pixel coordinates."""
    def comparisons(fn):
        rng = np.random.default_rng(7)
        x = np.concatenate([[-2.0, 0.0, _W - 1.0, _W + 0.5], _dyadic_points(rng, 40, 3.0)[0]])
        # Bilinear on a ramp U[m] = m is exact: V is the padded coordinate, dV/dx its slope.
        ramp = np.broadcast_to(np.arange(float(_W)), (1, _H, _W))
        y = np.full_like(x, 2.0)
        V = _reference(ramp, x, y, padding_mode="border")[0]
        _, d_ref = _reference(ramp, x, y, np.ones((1, x.size)), padding_mode="border")
        xp, dxp = fn(x, _W)
        yield "x' vs the reference sampler on a ramp", _err(xp, V), 1e-12, \
            "border padding clips x to [0, W - 1]"
        yield "dx'/dx vs the reference sampler", _err(dxp, d_ref[:, 0]), 1e-12, \
            "the clip's derivative is 0 beyond the ends and on them (x = 0 and x = W - 1 too)"
    _run("border_pad", border_pad, comparisons)


# ---- notebook 02 --------------------------------------------------------------------------
def check_linear_backward(linear_backward):
    """``linear_backward(dout, x, w, b) -> (dx, dw, db)`` for ``out = x w^T + b``."""
    def comparisons(fn):
        rng = np.random.default_rng(8)
        x, w, b = rng.normal(size=(5, 4)), rng.normal(size=(3, 4)), rng.normal(size=3)
        dout = rng.normal(size=(5, 3))
        dx, dw, db = fn(dout, x, w, b)
        for label, mine, arg in (("dx", dx, x), ("dw", dw, w), ("db", db, b)):
            num = numerical_gradient(lambda _: x @ w.T + b, arg, df=dout)
            yield f"{label} vs central differences", _err(mine, num), 1e-8, \
                "a gradient has the shape of its variable: that fixes every transpose"
    _run("linear_backward", linear_backward, comparisons)


def check_softmax_cross_entropy(softmax_cross_entropy):
    """``softmax_cross_entropy(logits, y) -> (loss, dlogits)``, the mean over the batch."""
    def comparisons(fn):
        rng = np.random.default_rng(9)
        z, y = 3 * rng.normal(size=(6, 10)), rng.integers(0, 10, size=6)
        loss, dz = fn(z, y)
        ref_loss, ref_dz = cross_entropy(z, y)
        yield "loss vs stn.layers.cross_entropy", _err(loss, ref_loss), 1e-12, \
            "the mean over the batch of -log softmax(z)[y]"
        num = numerical_gradient(lambda v: np.array(fn(v, y)[0]), z.copy())
        yield "dlogits vs central differences", _err(dz, num), 1e-7, "(softmax - onehot) / N"
        with np.errstate(all="ignore"):
            big, dbig = fn(np.array([[1000.0, 0.0, -1000.0]]), np.array([1]))
        finite = float(np.isfinite(big) and np.isfinite(dbig).all())
        yield "logits of +-1000 stay finite", 1 - finite, 0.5, "subtract each row's maximum first"
    _run("softmax_cross_entropy", softmax_cross_entropy, comparisons)


def check_maxpool_backward(maxpool_backward):
    """``maxpool_backward(dout, x, k) -> dx`` for non-overlapping k x k max-pooling."""
    def comparisons(fn):
        rng = np.random.default_rng(10)
        x = rng.normal(size=(2, 3, 5, 4))  # the last row fills no window
        x[0, 0, :2, :2] = 1.5  # a four-way tie
        pool = MaxPool2d(2)
        dout = rng.normal(size=pool.forward(x).shape)
        yield "dx vs stn.layers.MaxPool2d.backward", \
            _err(fn(dout, x, 2), pool.backward(dout)), 1e-12, \
            "route each dout to the first maximum of its window in row-major order"
    _run("maxpool_backward", maxpool_backward, comparisons)


# ---- notebook 03 --------------------------------------------------------------------------
def check_similarity_backward(similarity_backward):
    """``similarity_backward(dA, theta) -> dtheta`` (N, 4): dA (N, 2, 3) pulled back to
    ``theta = (angle, log scale, t_x, t_y)`` through ``A = stn.similarity_affine(theta)``."""
    def comparisons(fn):
        rng = np.random.default_rng(11)
        theta = np.column_stack([rng.uniform(-1.5, 1.5, 3), rng.normal(0, 0.3, 3),
                                 rng.normal(0, 0.2, 3), rng.normal(0, 0.2, 3)])
        dA = rng.normal(size=(3, 2, 3))
        num = numerical_gradient(stn.similarity_affine, theta.copy(), df=dA)
        yield "dtheta vs central differences", _err(fn(dA, theta), num), 1e-8, \
            "d/da of A is s times the derivative of R(a); t_x and t_y are copied"
        yield "dtheta vs stn.similarity_affine_backward", \
            _err(fn(dA, theta), stn.similarity_affine_backward(dA, theta)), 1e-12, None
    _run("similarity_backward", similarity_backward, comparisons)


# Every exercise: its checker and the lesson it belongs to.
EXERCISES = {
    "bilinear_forward": ("01", check_bilinear_forward),
    "bilinear_backward_dU": ("01", check_bilinear_backward_dU),
    "bilinear_dxy": ("01", check_bilinear_dxy),
    "affine_grid_backward": ("01", check_affine_grid_backward),
    "border_pad": ("01", check_border_pad),
    "linear_backward": ("02", check_linear_backward),
    "softmax_cross_entropy": ("02", check_softmax_cross_entropy),
    "maxpool_backward": ("02", check_maxpool_backward),
    "similarity_backward": ("03", check_similarity_backward),
}
