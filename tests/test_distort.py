"""Tests for stn_numpy.data.distort, on synthetic digits: laws every distortion must obey
(shape, range, determinism), closed forms (identity, exact 90-degree turns, scaled mass),
rotation against scipy's and the elastic warp against scipy's thin-plate spline."""

import numpy as np
import pytest
from scipy import interpolate, ndimage

from stn_numpy.data import distort
from stn_numpy.data.distort import (
    DATASETS,
    elastic,
    output_size,
    projective,
    rotate,
    rts,
    to_unit,
    translate_clutter,
)


def blobs(n=8, size=28, seed=0):
    """uint8 digits stand-ins: a few Gaussian strokes well inside the frame, full range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    images = np.zeros((n, size, size))
    for _ in range(3):
        cx, cy = rng.uniform(-5, 5, size=(2, n, 1, 1))
        images += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rng.uniform(1, 2.5) ** 2))
    images /= images.max(axis=(1, 2), keepdims=True)
    return np.round(255 * images).astype(np.uint8)


class HighRng:
    """A stand-in Generator whose uniform draws all return their upper bound."""

    def uniform(self, low=0.0, high=1.0, size=None):
        shape = np.shape(high) if size is None else size
        return np.broadcast_to(np.asarray(high, float), shape).copy()


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_shape_dtype_range(name):
    images = blobs(6)
    before = images.copy()
    out = DATASETS[name](images, np.random.default_rng(0))
    assert out.shape == (6, *output_size(name))
    assert out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    assert out.max() > 0.5
    np.testing.assert_array_equal(images, before)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_deterministic_given_seed(name):
    images = blobs(6)
    make = DATASETS[name]
    first = make(images, np.random.default_rng(7))
    np.testing.assert_array_equal(first, make(images, np.random.default_rng(7)))
    if name != "mnist":
        assert not np.array_equal(first, make(images, np.random.default_rng(8)))


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_uint8_and_float_agree(name):
    images = blobs(5)
    from_uint8 = DATASETS[name](images, np.random.default_rng(3))
    from_float = DATASETS[name](images / 255, np.random.default_rng(3))
    np.testing.assert_allclose(from_uint8, from_float, atol=1e-6)


def test_output_size_unknown():
    with pytest.raises(ValueError, match="unknown dataset 'x'"):
        output_size("x")


def test_input_validation():
    with pytest.raises(ValueError, match=r"shape \(N, H, W\)"):
        rotate(np.zeros((28, 28), np.uint8), np.random.default_rng(0))
    with pytest.raises(TypeError, match="int64"):
        rotate(np.zeros((1, 28, 28), np.int64), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[0, 1\].*divide uint8 pixels by 255"):
        rotate(np.full((1, 28, 28), 255.0), np.random.default_rng(0))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"canvas": 60.5}, "canvas must be a positive int, got 60.5"),
    ({"n_clutter": 2.5}, "n_clutter must be a non-negative int, got 2.5"),
    ({"n_clutter": -1}, "n_clutter must be a non-negative int, got -1"),
    ({"patch": 6.0}, "patch must be a positive int, got 6.0"),
])
def test_size_arguments_are_ints_never_truncated(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        translate_clutter(blobs(3), np.random.default_rng(0), **kwargs)
    if "canvas" in kwargs:
        with pytest.raises(ValueError, match=pattern):
            rts(blobs(3), np.random.default_rng(0), **kwargs)


def test_to_unit():
    images = blobs(3)
    np.testing.assert_allclose(to_unit(images), images / 255, atol=1e-7)


def test_rotate_zero_angle_is_identity():
    images = blobs()
    out = rotate(images, np.random.default_rng(0), max_angle=0)
    np.testing.assert_allclose(out, images / 255, atol=1e-6)


def test_rotate_quarter_turn_is_rot90():
    images = blobs()
    # Every drawn angle is +90 degrees: counter-clockwise on screen, as np.rot90 turns.
    out = rotate(images, HighRng(), max_angle=90)
    np.testing.assert_allclose(out, np.rot90(images, 1, axes=(1, 2)) / 255, atol=1e-5)


def test_rotate_preserves_mass():
    images = blobs(64)
    out = rotate(images, np.random.default_rng(0))
    np.testing.assert_allclose(out.sum(axis=(1, 2)), images.sum(axis=(1, 2)) / 255, rtol=0.02)


def test_rts_without_distortion_is_identity():
    images = blobs()
    out = rts(images, np.random.default_rng(0), max_angle=0, scale=(1, 1), canvas=28)
    np.testing.assert_allclose(out, images / 255, atol=1e-6)


def test_rts_translation_moves_right_and_down():
    images = blobs()
    # Scale 1 in a 42 x 42 canvas leaves 7 pixels of play; the upper bound puts the digit's
    # top-left corner at 7 + 7.
    out = rts(images, HighRng(), max_angle=0, scale=(1, 1), canvas=42)
    np.testing.assert_allclose(out[:, 14:, 14:], images / 255, atol=1e-6)
    assert out[:, :14].max() == 0 and out[:, :, :14].max() == 0


def test_rts_scale_scales_mass():
    images = blobs(16)
    # Every uniform draw at its upper end: angle 45 degrees, scale 1.2, the largest shift.
    out = rts(images, HighRng())
    np.testing.assert_allclose(
        out.sum(axis=(1, 2)), 1.2**2 * images.sum(axis=(1, 2)) / 255, rtol=0.02
    )


def test_rts_mean_mass_ratio():
    images = blobs(400)
    out = rts(images, np.random.default_rng(0))
    ratio = out.sum(axis=(1, 2)) / (images.sum(axis=(1, 2)) / 255)
    # E[s^2] for s uniform in [0.7, 1.2]: (1.2^3 - 0.7^3) / (3 * 0.5).
    assert ratio.mean() == pytest.approx((1.2**3 - 0.7**3) / 1.5, abs=0.03)
    assert ratio.min() > 0.7**2 - 0.02 and ratio.max() < 1.2**2 + 0.02


def test_projective_without_noise_is_identity():
    images = blobs()
    out = projective(images, np.random.default_rng(0), sigma=0.0, scale=(1.0, 1.0))
    np.testing.assert_allclose(out, images / 255, atol=1e-5)


def test_homography_maps_the_four_points():
    rng = np.random.default_rng(0)
    corners = np.array([[-14.0, -14], [14, -14], [14, 14], [-14, 14]])
    moved = corners + rng.normal(0, 1.4, size=(5, 4, 2))
    maps = distort._homography(moved, corners)
    mapped = np.concatenate([moved, np.ones((5, 4, 1))], axis=2) @ maps.transpose(0, 2, 1)
    np.testing.assert_allclose(mapped[..., :2] / mapped[..., 2:], np.tile(corners, (5, 1, 1)))


def test_projective_mass_shrinks_with_scale():
    images = blobs(200)
    out = projective(images, np.random.default_rng(0))
    ratio = out.sum(axis=(1, 2)) / (images.sum(axis=(1, 2)) / 255)
    # E[s^2] for s uniform in [0.75, 1]; the corner noise is zero-mean.
    assert ratio.mean() == pytest.approx((1 - 0.75**3) / 0.75, abs=0.05)


class FixedRng:
    """A stand-in Generator: uniform draws return ``scale``, normal draws return ``noise``."""

    def __init__(self, scale, noise):
        self.scale, self.noise = scale, noise

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.full(size, self.scale)

    def normal(self, loc=0.0, scale=1.0, size=None):
        assert np.shape(self.noise) == size
        return self.noise


def test_elastic_without_perturbation_is_identity():
    images = blobs()
    out = elastic(images, np.random.default_rng(0), sigma=0.0, scale=(1.0, 1.0))
    np.testing.assert_allclose(out, images / 255, atol=1e-6)


def test_elastic_without_perturbation_is_a_zoom_about_the_centre():
    images = blobs()
    out = elastic(images, np.random.default_rng(0), sigma=0.0, scale=(0.8, 0.8))
    # Output pixel i reads input pixel c + (i - c) / 0.8, c the centre 13.5.
    expected = np.stack(
        [
            ndimage.affine_transform(
                image / 255,
                np.eye(2) / 0.8,
                offset=13.5 - 13.5 / 0.8,
                order=1,
                mode="grid-constant",
            )
            for image in images
        ]
    )
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.8])
def test_elastic_matches_an_independent_thin_plate_spline(scale):
    # scipy's RBFInterpolator with the thin-plate kernel r^2 log r and a degree-1 polynomial
    # is the interpolating thin-plate spline (our kernel r^2 log r^2 differs by a factor 2,
    # which the weights absorb). It maps each output pixel centre, in the normalised frame
    # whose -1 and 1 are the image's outer edges, through the 4 x 4 lattice moved by eps;
    # dividing by the scale and reading the input bilinearly with zeros outside
    # (map_coordinates, grid-constant) must give what elastic gives.
    n, size = 4, 28
    images = blobs(n, size)
    eps = np.random.default_rng(1).normal(0.0, 0.1, size=(n, 16, 2))
    out = elastic(images, FixedRng(scale, eps))

    t = np.linspace(-1, 1, 4)
    lattice = np.stack(np.meshgrid(t, t), axis=-1).reshape(16, 2)  # (x, y), y outer
    centres = (2 * np.arange(size) + 1) / size - 1
    targets = np.stack(np.meshgrid(centres, centres), axis=-1).reshape(-1, 2)
    for image, moved, warped in zip(images / 255, lattice + eps, out, strict=True):
        spline = interpolate.RBFInterpolator(lattice, moved, kernel="thin_plate_spline")
        x_s, y_s = (((spline(targets) / scale + 1) * size - 1) / 2).T
        expected = ndimage.map_coordinates(image, [y_s, x_s], order=1, mode="grid-constant")
        np.testing.assert_allclose(warped.ravel(), expected, atol=1e-6)


def test_elastic_perturbation_moves_mass():
    images = blobs(200)
    out = elastic(images, np.random.default_rng(0), scale=(1.0, 1.0))
    before, after = images / 255, out
    # Every digit changes shape: a stroke shifted by ~1 pixel changes its pixels by a good
    # fraction of their value.
    change = np.abs(after - before).sum(axis=(1, 2)) / before.sum(axis=(1, 2))
    assert change.min() > 0.05
    # ... and its centre of mass moves, by about a pixel on average.
    yy, xx = np.mgrid[0:28, 0:28]

    def centroid(x):
        mass = x.sum(axis=(1, 2))
        return np.stack([(x * xx).sum(axis=(1, 2)), (x * yy).sum(axis=(1, 2))], 1) / mass[:, None]

    shift = np.linalg.norm(centroid(after) - centroid(before), axis=1)
    assert 0.3 < shift.mean() < 3
    # The perturbation is zero-mean, so the warp's area change averages out: per digit the
    # mass changes by about 20 % (standard deviation), the mean over 200 by about 1.4 %.
    ratio = after.sum(axis=(1, 2)) / before.sum(axis=(1, 2))
    assert ratio.mean() == pytest.approx(1.0, abs=0.05)


def test_elastic_mass_shrinks_with_scale():
    images = blobs(200)
    out = elastic(images, np.random.default_rng(0))
    ratio = out.sum(axis=(1, 2)) / (images.sum(axis=(1, 2)) / 255)
    # E[s^2] for s uniform in [0.75, 1]; the control-point noise is zero-mean.
    assert ratio.mean() == pytest.approx((1 - 0.75**3) / 0.75, abs=0.05)


def test_elastic_rejects_negative_sigma():
    with pytest.raises(ValueError, match="sigma must be >= 0, got -0.1"):
        elastic(blobs(1), np.random.default_rng(0), sigma=-0.1)


def test_translate_places_the_digit_exactly():
    images = blobs(5)
    out = translate_clutter(images, np.random.default_rng(0), n_clutter=0)
    for image, canvas in zip(images / 255, out, strict=True):
        found = [
            (r, c)
            for r in range(60 - 28 + 1)
            for c in range(60 - 28 + 1)
            if np.allclose(canvas[r : r + 28, c : c + 28], image, atol=1e-7)
        ]
        assert len(found) == 1
        assert canvas.sum() == pytest.approx(image.sum(), rel=1e-6)


def test_clutter_patch_from_other_images():
    images = np.stack([np.zeros((28, 28)), np.ones((28, 28))]).astype(np.uint8) * 255
    out = translate_clutter(images, np.random.default_rng(0), n_clutter=1)
    # Image 0 is blank, so its canvas shows exactly one 6 x 6 patch cut from image 1;
    # image 1's only possible clutter source is the blank image 0.
    rows, cols = np.nonzero(out[0])
    assert out[0].sum() == 36 and np.ptp(rows) == 5 and np.ptp(cols) == 5
    assert out[1].sum() == 28 * 28


def test_clutter_from_separate_images_adds_and_clips():
    images = np.zeros((4, 28, 28), np.uint8)
    ones = np.ones((2, 28, 28))
    out = translate_clutter(images, np.random.default_rng(0), n_clutter=6, clutter_images=ones)
    assert out.max() == 1.0
    assert np.all(out.sum(axis=(1, 2)) <= 6 * 36)
    assert np.all(out.sum(axis=(1, 2)) >= 36)


def test_clutter_needs_two_images():
    with pytest.raises(ValueError, match="at least 2 images"):
        translate_clutter(blobs(1), np.random.default_rng(0))


def test_rotate_matches_scipy():
    images = blobs()
    # scipy.ndimage.rotate turns counter-clockwise as displayed too, about the same centre.
    out = rotate(images, HighRng(), max_angle=30)
    expected = ndimage.rotate(
        images / 255, 30, axes=(1, 2), reshape=False, order=1, mode="grid-constant"
    )
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_returned_angles_reproduce_rotate():
    images = blobs()
    out, params = rotate(images, np.random.default_rng(3), return_params=True)
    np.testing.assert_array_equal(out, rotate(images, np.random.default_rng(3)))
    assert set(params) == {"angle"} and np.abs(params["angle"]).max() <= 90
    for image, angle, warped in zip(images / 255, params["angle"], out, strict=True):
        expected = ndimage.rotate(image, angle, reshape=False, order=1, mode="grid-constant")
        np.testing.assert_allclose(warped, expected, atol=1e-6)


def test_returned_rts_parameters_reproduce_the_image():
    # scipy's affine_transform takes the inverse map in (row, col) pixel indices:
    # input = M (output - c_out) + c_in with (x, y)_in = R(a)^T ((x, y)_out - t) / s.
    images = blobs(6)
    out, params = rts(images, np.random.default_rng(4), return_params=True)
    np.testing.assert_array_equal(out, rts(images, np.random.default_rng(4)))
    c_in, c_out = 13.5, 20.5
    for i, warped in enumerate(out):
        a, s, t = np.deg2rad(params["angle"][i]), params["scale"][i], params["translation"][i]
        inv_xy = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) / s
        M = inv_xy[::-1, ::-1]  # (x, y) -> (row, col)
        offset = c_in - M @ (np.array([c_out, c_out]) + t[::-1])
        expected = ndimage.affine_transform(images[i] / 255, M, offset, output_shape=(42, 42),
                                            order=1, mode="grid-constant")
        np.testing.assert_allclose(warped, expected, atol=1e-6)


def test_returned_corners_bound_the_projected_frame():
    # An all-white input lands exactly on the quadrilateral of the returned corners: pixel
    # centres a pixel inside it are white, a pixel outside black.
    from matplotlib.path import Path

    ones = np.ones((5, 28, 28))
    out, params = projective(ones, np.random.default_rng(5), sigma=0.1, return_params=True)
    assert params["corners"].shape == (5, 4, 2)
    rows, cols = np.mgrid[0:28, 0:28]
    centres = np.stack([cols.ravel() - 13.5, rows.ravel() - 13.5], axis=1)
    for warped, corners in zip(out, params["corners"], strict=True):
        quad = Path(corners)
        inner = quad.contains_points(centres, radius=-2.0) & quad.contains_points(centres)
        outer = ~(quad.contains_points(centres, radius=2.0) | quad.contains_points(centres))
        assert inner.sum() > 300 and outer.sum() > 10
        np.testing.assert_allclose(warped.ravel()[inner], 1, atol=1e-5)
        np.testing.assert_allclose(warped.ravel()[outer], 0, atol=1e-6)


def test_returned_control_points_reproduce_elastic():
    images = blobs(4)
    out, params = elastic(images, np.random.default_rng(6), return_params=True)
    scale, moved = params["scale"], params["control_points"]
    assert moved.shape == (4, 16, 2)
    eps = moved - distort.tps_lattice((4, 4))
    np.testing.assert_allclose(out, elastic(images, FixedRng(scale, eps)), atol=1e-6)


@pytest.mark.parametrize("n_clutter", [0, 6])
def test_returned_box_holds_the_digit(n_clutter):
    images = blobs(5)
    out, params = translate_clutter(images, np.random.default_rng(7), n_clutter=n_clutter,
                                    return_params=True)
    for image, (top, left, h, w), canvas in zip(images / 255, params["box"], out, strict=True):
        assert (h, w) == (28, 28)
        inside = canvas[top:top + h, left:left + w]
        assert np.all(inside >= np.minimum(image, 1) - 1e-6)  # clutter only adds ink
        if n_clutter == 0:
            np.testing.assert_allclose(inside, image, atol=1e-6)
            assert canvas.sum() == pytest.approx(inside.sum(), rel=1e-6)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_params_leave_the_images_unchanged(name):
    images = blobs(4)
    out, params = DATASETS[name](images, np.random.default_rng(8), return_params=True)
    np.testing.assert_array_equal(out, DATASETS[name](images, np.random.default_rng(8)))
    assert all(len(v) == 4 for v in params.values())
