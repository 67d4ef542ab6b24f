"""Tests for stn_numpy.measures on synthetic transforms with known answers."""

import numpy as np
import pytest

from stn_numpy.data.distort import rotate, translate
from stn_numpy.grids import affine_grid
from stn_numpy.measures import (
    affine_theta,
    ink_inside,
    linear_fit,
    rotation_angle,
    scale_translation,
    transformer_measures,
)
from stn_numpy.models import build_model
from stn_numpy.sampling import grid_sample


def similarity(degrees, scale=1.0, shift=(0.0, 0.0)):
    a = np.deg2rad(np.atleast_1d(degrees))
    s = np.broadcast_to(scale, a.shape)
    theta = np.zeros((len(a), 2, 3))
    theta[:, 0, 0], theta[:, 0, 1] = s * np.cos(a), -s * np.sin(a)
    theta[:, 1, 0], theta[:, 1, 1] = s * np.sin(a), s * np.cos(a)
    theta[:, :, 2] = shift
    return theta


def test_rotation_angle_of_known_rotations():
    angles = np.array([-170.0, -90, -30, 0, 12.5, 90, 179])
    np.testing.assert_allclose(rotation_angle(similarity(angles, scale=0.6)), angles)


def test_the_undoing_rotation_has_slope_minus_one():
    # Rotating an image by a, then sampling it through theta = R(a) (the transposed
    # generator map) gives back the image: the measured angle is -a.
    rng = np.random.default_rng(0)
    digits = np.zeros((6, 28, 28))
    digits[:, 6:22, 12:16] = 1.0  # an upright bar
    rotated, params = rotate(digits, rng, return_params=True)
    theta = similarity(-params["angle"])
    V = grid_sample(rotated[:, None].astype(np.float64), affine_grid(theta, (6, 1, 28, 28)))
    assert np.abs(V[:, 0] - digits).mean() < 0.05
    fit = linear_fit(params["angle"], rotation_angle(theta))
    assert fit["slope"] == pytest.approx(-1) and fit["r2"] == pytest.approx(1)


def test_linear_fit_closed_form():
    x = np.arange(10.0)
    y = 3 * x - 2 + np.where(x % 2, 1.0, -1.0)
    fit = linear_fit(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    assert fit["r2"] == pytest.approx(1 - residual @ residual / np.sum((y - y.mean()) ** 2))
    assert linear_fit(x, np.full(10, 4.0))["r2"] == 1.0
    with pytest.raises(ValueError, match="x must hold"):
        linear_fit(np.ones(5), np.arange(5.0))
    with pytest.raises(ValueError, match="same size"):
        linear_fit(np.arange(3.0), np.arange(4.0))


@pytest.mark.parametrize("align_corners", [False, True])
def test_scale_translation_in_pixels(align_corners):
    theta = similarity([0.0, 30.0], scale=[0.5, 28 / 42], shift=[[0.2, -0.4], [0.0, 0.1]])
    scale, shift = scale_translation(theta, (42, 42), digit=28, align_corners=align_corners)
    np.testing.assert_allclose(scale, [0.5 * 42 / 28, 1.0])
    half = 20.5 if align_corners else 21.0
    np.testing.assert_allclose(shift, [[0.2 * half, -0.4 * half], [0.0, 0.1 * half]])


def test_ink_inside_counts_pixels():
    digits = np.ones((3, 28, 28))
    box = np.array([[0, 0, 28, 28], [16, 32, 28, 28], [16, 32, 28, 28]])
    identity = similarity([0.0, 0.0])
    # The window x in [0, 1] (the right half of a 60x60 canvas), y in [-1, 1].
    right_half = np.array([[[0.5, 0, 0.5], [0, 1, 0]]])
    theta = np.concatenate([identity, right_half])
    fractions = ink_inside(theta, digits, box, (60, 60))
    # Columns 32-59 all lie in the right half (x > 0 for column >= 30).
    np.testing.assert_allclose(fractions, [1.0, 1.0, 1.0])
    left_half = np.array([[[0.5, 0, -0.5], [0, 1, 0]]])
    np.testing.assert_allclose(ink_inside(left_half, digits[:1], box[1:2], (60, 60)), [0.0])
    # Columns 0..27 of a box at column 16: the window x in [-1, 0] keeps columns 16..29.
    np.testing.assert_allclose(ink_inside(left_half, digits[:1], np.array([[0, 16, 28, 28]]),
                                          (60, 60)), [14 / 28])
    singular = np.zeros((1, 2, 3))
    np.testing.assert_allclose(ink_inside(singular, digits[:1], box[:1], (60, 60)), [0.0])


def test_attention_is_the_diagonal_affine():
    theta = affine_theta(np.array([[0.5, 0.1, -0.2]]), "attention")
    np.testing.assert_array_equal(theta, [[[0.5, 0, 0.1], [0, 0.5, -0.2]]])
    with pytest.raises(ValueError, match="transform must be"):
        affine_theta(np.zeros((1, 8)), "projective")


def test_transformer_measures_of_an_untrained_model():
    # At initialisation the transformer is the identity: no rotation recovered, the whole
    # canvas as window, so every digit's ink is inside.
    rng = np.random.default_rng(1)
    digits = rng.random((5, 28, 28)) * (rng.random((5, 28, 28)) > 0.7)
    X, params = translate(digits, rng, return_params=True)
    params["digits"] = digits
    model = build_model("paper-stcnn", (60, 60), st_size=28)
    m = transformer_measures(model, X[:, None], params, "t")
    assert m["ink_inside"]["mean"] == pytest.approx(1.0)
    X, params = rotate(digits, rng, return_params=True)
    m = transformer_measures(build_model("paper-stcnn"), X[:, None], params, "rot")
    assert m["rotation"]["slope"] == pytest.approx(0, abs=1e-6)
    assert transformer_measures(build_model("paper-cnn"), X[:, None], params, "rot") == {}


def test_a_similarity_heads_rotation_is_its_angle_and_its_scale_and_shift_read_directly():
    # theta = (a, log s, t_x, t_y) is A = s R(a) beside t: the affine measures agree, and
    # the rotation is the angle itself, unwrapped (a head past a half-turn shows as such).
    rng = np.random.default_rng(2)
    digits = rng.random((6, 28, 28)) * (rng.random((6, 28, 28)) > 0.7)
    X, params = rotate(digits, rng, return_params=True)
    params["digits"] = digits
    model = build_model("paper-stcnn", transform="similarity")
    head = model.transformer.localization[-1].params
    bias = np.array([0.0, np.log(0.8), 0.1, -0.2], np.float32)
    head["bias"][...] = bias
    np.testing.assert_allclose(affine_theta(bias[None], "similarity"),
                               similarity(0.0, 0.8, (0.1, -0.2)), rtol=1e-6)
    m = transformer_measures(model, X[:, None], params, "rot")
    assert m["rotation"]["slope"] == pytest.approx(0, abs=1e-6)
    assert set(m) == {"rotation"}
    from stn_numpy.measures import transformer_params

    flat = transformer_params(model, X[:, None])
    np.testing.assert_allclose(flat, np.tile(bias, (6, 1)), rtol=1e-6)
    head["bias"][0] = 3 * np.pi  # past a half-turn: 540 degrees, not 180
    rotation = transformer_measures(model, X[:, None], params, "rot")["rotation"]
    np.testing.assert_allclose(rotation["recovered"], 540.0, rtol=1e-6)
