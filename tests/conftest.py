"""Shared test helpers: random inputs placed away from the kinks of the samplers, a
finite-difference check of a sampler, and where the real MNIST files are."""

import os
from pathlib import Path

import numpy as np
import pytest

from stn_numpy.data import mnist
from stn_numpy.gradcheck import numerical_gradient, rel_error


def normalize(u, size, align_corners):
    """Pixel coordinate -> normalized coordinate (the inverse of the sampler's unnormalize)."""
    if align_corners:
        return 2 * u / (size - 1) - 1
    return (2 * u + 1) / size - 1


def smooth_pixel_coords(rng, shape, size, margin=2):
    """Pixel coordinates whose fractional part stays in [0.15, 0.35] or [0.65, 0.85].

    Every kink of the samplers sits on an integer or half-integer pixel coordinate: the
    bilinear and bicubic kernels change taps at integers, nearest rounding jumps at
    half-integers, border clipping acts at 0 and size - 1, and reflection folds at 0 and
    size - 1 (align_corners=True) or -1/2 and size - 1/2 (align_corners=False). Reflection
    maps a fraction f to f or 1 - f, which stays inside these bands. So a central
    difference with a step of ~1e-6 pixels never straddles a kink, and the sampler is
    smooth (or, for nearest, constant) across it.
    """
    base = rng.integers(-margin, size + margin - 1, size=shape)
    frac = rng.uniform(0.15, 0.35, size=shape)
    frac = np.where(rng.random(shape) < 0.5, frac, frac + 0.5)
    return base + frac


def smooth_grid(rng, N, Ho, Wo, H, W, align_corners, margin=2):
    """A float64 grid (N, Ho, Wo, 2) of normalized coordinates away from every kink."""
    x = smooth_pixel_coords(rng, (N, Ho, Wo), W, margin)
    y = smooth_pixel_coords(rng, (N, Ho, Wo), H, margin)
    return np.stack([normalize(x, W, align_corners), normalize(y, H, align_corners)], axis=-1)


def smooth_volume_grid(rng, N, out, D, H, W, align_corners, margin=2):
    """A float64 grid (N, Do, Ho, Wo, 3) of (x, y, z) away from every kink."""
    return np.stack([normalize(smooth_pixel_coords(rng, (N, *out), size, margin), size,
                               align_corners)
                     for size in (W, H, D)], axis=-1)


def assert_same_bits(results):
    """Every tuple of arrays in ``results`` holds the bits of the first, array by array
    (bytes, so that NaN payloads compare too, and views of any layout)."""
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                                  np.ascontiguousarray(b).view(np.uint8))


def assert_sampler_gradients(sample, sample_backward, rng, mode, padding_mode, align_corners):
    """Check ``sample_backward`` (the signature of grid_sample_backward) by central differences
    of ``sample`` (that of grid_sample), on a grid away from every kink."""
    N, C, H, W, Ho, Wo = 2, 2, 4, 5, 3, 4
    U = rng.standard_normal((N, C, H, W))
    grid = smooth_grid(rng, N, Ho, Wo, H, W, align_corners)
    dV = rng.standard_normal((N, C, Ho, Wo))
    opts = (mode, padding_mode, align_corners)
    dU, dgrid = sample_backward(dV, U, grid, *opts)
    # V is linear in U, so central differences are exact up to round-off.
    assert rel_error(dU, numerical_gradient(lambda u: sample(u, grid, *opts), U.copy(), dV)) < 1e-8
    num_dgrid = numerical_gradient(lambda g: sample(U, g, *opts), grid.copy(), dV)
    if mode == "nearest":
        assert np.all(dgrid == 0) and np.all(num_dgrid == 0)
    else:
        assert rel_error(dgrid, num_dgrid) < 1e-7  # smooth away from kinks: O(h^2)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def mnist_dir():
    """Folder holding the four original MNIST .gz files, as a str; skips the test if none.

    ``STN_NUMPY_DATA`` first, then ``../shared/data/mnist`` beside this repository.
    """
    candidates = []
    if os.environ.get(mnist.ENV_VAR):
        candidates.append(Path(os.environ[mnist.ENV_VAR]))
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist")
    names = [name for pair in mnist.FILES.values() for name in pair]
    for root in candidates:
        if all((root / name).is_file() for name in names):
            return str(root)
    pytest.skip(f"MNIST files not found: set {mnist.ENV_VAR} to a folder with the four .gz files")
