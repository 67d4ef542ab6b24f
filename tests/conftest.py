"""Shared test helpers: random inputs placed away from the kinks of the samplers."""

import numpy as np
import pytest


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


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
