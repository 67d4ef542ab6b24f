"""Every re-created bug of stn_numpy.verify.mutants is flagged, on exactly its rows, saying where.

Mutation testing for the checker: a check that lets one of these through is broken.
"""

import numpy as np
import pytest

from stn_numpy import affine_grid, grid_sample
from stn_numpy.gradcheck import check_gradient
from stn_numpy.verify import format_table, numpy_impl, parity_matrix
from stn_numpy.verify.mutants import MUTANTS


@pytest.mark.parametrize("name", MUTANTS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_each_mutant_is_flagged_on_its_rows(name, dtype):
    mutant, must_fail = MUTANTS[name]
    rows = parity_matrix(mutant, dtype=dtype)
    failed = {(r.mode, r.padding_mode, r.align_corners) for r in rows if not r.passed}
    expected = {(r.mode, r.padding_mode, r.align_corners) for r in rows if must_fail(
        r.mode, r.padding_mode, r.align_corners)}
    assert failed == expected, format_table(rows)
    table = format_table(rows)
    for r in rows:
        if not r.passed:
            notes = [line for line in table.splitlines() if line.startswith(r.case + ": ")]
            assert notes, f"{r.case} fails without saying where"
            assert all("worst at" in n or "not deterministic" in n or "<V, dV>" in n
                       for n in notes)


def test_the_identity_bug_shows_at_the_identity():
    # The TF STN case study: with theta = identity, V must be U; the mutant's is not.
    mutant, _ = MUTANTS["tf_stn_pixel_range"]
    U = np.random.default_rng(0).standard_normal((1, 1, 6, 7))
    grid = affine_grid(np.eye(2, 3)[None], U.shape, align_corners=True)
    dV = np.ones_like(U)
    np.testing.assert_allclose(numpy_impl(U, grid, dV, "bilinear", "border", True)[0], U,
                               atol=1e-12)
    assert np.abs(mutant(U, grid, dV, "bilinear", "border", True)[0] - U).max() > 0.1


def test_mutants_pass_a_random_finite_difference_test():
    # Why verify needs special points and a reference: at random points (never on a
    # pixel, a tie or the last pixel) the coordinate-gradient bugs are invisible to
    # central differences of the mutant's own forward.
    rng = np.random.default_rng(1)
    U = rng.standard_normal((1, 2, 5, 6))
    grid = rng.uniform(-0.9, 0.9, size=(1, 4, 4, 2))
    dV = rng.standard_normal((1, 2, 4, 4))
    for name in ("clip_gradient_at_last_pixel", "ceil_upper_tap"):
        mutant, _ = MUTANTS[name]
        _, _, dgrid = mutant(U, grid, dV, "bilinear", "border", False)
        report = check_gradient(lambda g: grid_sample(U, g, "bilinear", "border"), grid.copy(),
                                dgrid, df=dV)
        assert report.max_rel_error < 1e-6, (name, report)
