"""Tests for stn_numpy.verify.second_order: the double backward parity rows, golden cases
and ``stn-numpy verify --order 2``."""

import pytest

from stn_numpy.verify import (
    check_against_golden,
    export_golden,
    format_table,
    main,
    numpy_double_backward,
    second_order_matrix,
    second_order_matrix_3d,
)
from stn_numpy.verify.parity import Unsupported


def test_own_double_backward_agrees_exactly_and_the_table_shows_its_columns():
    results = second_order_matrix("numpy")
    assert len(results) == 18 and all(r.status == "PASS" for r in results)
    assert all(r.max_error == 0 for r in results)
    table = format_table(results)
    assert "err d_grid" in table and "err dgrid" not in table  # first-order columns left out
    assert results[0].case == "second_order/bilinear/zeros/align_corners=True"


def test_torch_double_backward_matches_on_every_combination():
    pytest.importorskip("torch", reason="PyTorch not installed: pip install torch==2.13.0")
    results = second_order_matrix(seed=3, repeat=False)
    assert all(r.status == "PASS" for r in results), format_table(results)
    assert max(r.max_error for r in results) < 1e-14


def test_volume_rows_agree_with_torch_and_catch_a_wrong_double_backward():
    pytest.importorskip("torch", reason="PyTorch not installed: pip install torch==2.13.0")
    results = second_order_matrix_3d(seed=3, repeat=False)
    assert len(results) == 12 and all(r.status == "PASS" for r in results), format_table(results)
    assert max(r.max_error for r in results) < 1e-14
    assert results[0].case == "second_order/3d/bilinear/zeros/align_corners=True"
    bad = second_order_matrix_3d(drop_grid_grid_term, repeat=False)
    assert {r.mode for r in bad if r.status == "FAIL"} == {"bilinear"}


def drop_grid_grid_term(U, grid, dV, ddU, ddgrid, mode, padding_mode, align_corners):
    """A double backward that forgets d(dgrid)/d(grid) (a plausible port bug): its grid
    gradient is the one of ddU alone."""
    d_dV, d_U, _ = numpy_double_backward(U, grid, dV, ddU, ddgrid, mode, padding_mode,
                                         align_corners)
    _, _, d_grid = numpy_double_backward(U, grid, dV, ddU, None, mode, padding_mode,
                                         align_corners)
    return d_dV, d_U, d_grid


def test_a_wrong_double_backward_fails_its_rows_and_says_where():
    results = second_order_matrix(drop_grid_grid_term, repeat=False)
    failing = {r.mode for r in results if r.status == "FAIL"}
    assert failing == {"bilinear", "bicubic"}  # nearest has no grid terms to forget
    assert "worst at d_grid" in format_table(results)


def test_failures_of_the_callable_are_rows_not_crashes():
    def raises(*args):
        raise ValueError("no double backward\nhere")

    def unsupported(*args):
        raise Unsupported("not expressible")

    def wrong_shape(*args):
        d_dV, d_U, d_grid = numpy_double_backward(*args)
        return d_dV, d_U[:, :1], d_grid

    assert {r.status for r in second_order_matrix(raises, repeat=False)} == {"ERROR"}
    assert "ValueError: no double backward here" in second_order_matrix(raises)[0].failure
    assert {r.status for r in second_order_matrix(unsupported)} == {"N/A"}
    assert "d_U of shape" in second_order_matrix(wrong_shape)[0].failure
    with pytest.raises(TypeError, match="other must be"):
        second_order_matrix("scipy")


def test_odd_results_and_exits_of_the_callable_are_errors_as_for_the_sampler():
    # The same checks as the first-order rows: complex values are not passed off by
    # rel_error's real part, a sys.exit() inside the callable is its row's error, and the
    # callable cannot leave NumPy's error handling changed.
    import sys

    import numpy as np

    def complex_(*args):
        return tuple(a + 1e-3j for a in numpy_double_backward(*args))

    def exits(*args):
        sys.exit(0)

    def raises_on_warnings(*args):
        np.seterr(all="raise")
        return numpy_double_backward(*args)

    before = np.geterr()
    assert {r.status for r in second_order_matrix(complex_, repeat=False)} == {"ERROR"}
    assert "d_dV of dtype complex128" in second_order_matrix(complex_)[0].failure
    assert {r.status for r in second_order_matrix(exits, repeat=False)} == {"ERROR"}
    assert second_order_matrix(exits)[0].failure.startswith("SystemExit")
    assert {r.status for r in second_order_matrix(raises_on_warnings)} == {"PASS"}
    assert np.geterr() == before


def test_golden_second_order_cases(tmp_path):
    path = export_golden(tmp_path / "golden.npz")
    results = check_against_golden(path, order=2)
    assert len(results) == 18 + 12 and all(r.status == "PASS" for r in results)
    assert results[0].case == "second_order/bilinear/zeros/align_corners=True"
    assert results[18].case == "second_order/3d/bilinear/zeros/align_corners=True"
    bad = check_against_golden(path, drop_grid_grid_term, order=2)
    assert {r.case.startswith("second_order/3d/") for r in bad if r.status == "FAIL"} == {
        True, False}  # caught on images and on volumes
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        check_against_golden(path, order=3)


def test_main_order_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_double.py").write_text(
        "from stn_numpy.verify import numpy_double_backward as good\n"
        "def bad(U, grid, dV, ddU, ddgrid, mode, padding_mode, align_corners):\n"
        "    a, b, c = good(U, grid, dV, ddU, ddgrid, mode, padding_mode, align_corners)\n"
        "    return a, b, -c\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["verify", "--order", "2", "--against", "user_double:good"]) == 0
    assert "18/18 cases within tol 1e-10" in capsys.readouterr().out
    assert main(["verify", "--order", "2", "--against", "user_double:bad"]) == 1
    capsys.readouterr()
    assert main(["verify", "--order", "2", "--dims", "3", "--against", "user_double:good"]) == 0
    out = capsys.readouterr().out
    assert "volumes" in out and "12/12 cases within tol 1e-10" in out
    assert main(["verify", "--order", "2", "--against", "scipy"]) == 2
    assert "no double backward" in capsys.readouterr().err
    assert main(["verify", "--order", "2", "--export", str(tmp_path / "g.npz")]) == 2
