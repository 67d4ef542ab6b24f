"""Tests for stn_numpy.verify: parity matrix, golden vectors, command line."""

import itertools
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from stn_numpy import grid_sample, grid_sample_backward, verify
from stn_numpy.sampling import MODES, PADDING_MODES
from stn_numpy.verify import (
    ParityResult,
    TorchNotInstalledError,
    default_tol,
    export_golden,
    format_table,
    load_golden,
    main,
    make_grid,
    parity_matrix,
)

TORCH_MISSING = "PyTorch not installed: pip install torch==2.13.0"
# 18 sampler combinations, 84 sampler edge cases, 4 grid transforms x 2, one whole layer
N_GOLDEN_CASES = 18 + 84 + 8 + 1 + 26 + 18 + 12  # ..., volumes, double backward (2-D, 3-D)
ALL_COMBOS = set(itertools.product(MODES, PADDING_MODES, [True, False]))


def ours(U, grid, dV, mode, padding_mode, align_corners):
    """The reference sampler wrapped by hand, as a user would wrap their own."""
    V = grid_sample(U, grid, mode, padding_mode, align_corners)
    dU, dgrid = grid_sample_backward(dV, U, grid, mode, padding_mode, align_corners)
    return V, dU, dgrid


def flipped_align_corners(U, grid, dV, mode, padding_mode, align_corners):
    return ours(U, grid, dV, mode, padding_mode, not align_corners)


def perturbed_dgrid(U, grid, dV, mode, padding_mode, align_corners):
    V, dU, dgrid = ours(U, grid, dV, mode, padding_mode, align_corners)
    return V, dU, dgrid * (1 + 1e-8) + 1e-9


def left_derivative_at_kinks(U, grid, dV, mode, padding_mode, align_corners):
    # Shifting the grid by far less than the tolerance only matters at a kink, where the
    # gradient then comes from its left side instead of the right-hand side torch takes.
    V, dU, _ = ours(U, grid, dV, mode, padding_mode, align_corners)
    _, _, dgrid = ours(U, grid - 1e-12, dV, mode, padding_mode, align_corners)
    return V, dU, dgrid


def combos(results):
    return {(r.mode, r.padding_mode, r.align_corners) for r in results if r.op == "grid_sample"}


def pixel_coords(coord, size, align_corners):
    """Normalized -> pixel coordinates, written out independently of the sampler."""
    if align_corners:
        return (coord + 1) / 2 * (size - 1)
    return ((coord + 1) * size - 1) / 2


def rewrite_golden(path, arrays, manifest):
    with open(path, "wb") as f:
        np.savez(f, manifest=np.frombuffer(json.dumps(manifest).encode(), np.uint8), **arrays)


# ---------------------------------------------------------------------------------------
# make_grid
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("align_corners,H,W", [(True, 9, 5), (False, 4, 8)])
def test_make_grid_puts_points_exactly_on_every_kink(align_corners, H, W):
    # Sizes whose unnormalization scale, (W - 1) / 2 or W / 2, is a power of two: every
    # kink is reachable by some float, so every one must be hit bit for bit.
    grid = make_grid(2, 7, 8, H, W, align_corners, rng=3)
    x = pixel_coords(grid[..., 0], W, align_corners).ravel()
    y = pixel_coords(grid[..., 1], H, align_corners).ravel()
    lo, hi = (0, W - 1) if align_corners else (-0.5, W - 0.5)
    for u in [0, 1, W - 1, 0.5, W - 1.5, -1, W, lo, hi, 2 * lo - hi, 2 * hi - lo]:
        assert (x == u).any(), f"no point at pixel x = {u}"
    lo, hi = (0, H - 1) if align_corners else (-0.5, H - 0.5)
    for v in [0, H - 1, -1, H, -0.5, H - 0.5, 2 * lo - hi, 2 * hi - lo]:
        assert (y == v).any(), f"no point at pixel y = {v}"
    for u, v in itertools.product([-1, 0, W - 1, W], [-1, 0, H - 1, H]):
        assert ((x == u) & (y == v)).any(), f"no point at the corner ({u}, {v})"
    assert (np.abs(grid) > 1).any() and (np.abs(grid) < 1).all(axis=-1).any()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("align_corners", [True, False])
def test_make_grid_kinks_do_not_depend_on_fused_multiply_add(dtype, align_corners):
    # With scales 2.5 and 3 many kinks are reachable by no float; the points an ulp off
    # must round to the same value whether (c + 1) * s - o is rounded in two steps or
    # once (a fused multiply-add), or implementations would disagree about the side.
    H, W = 5, 6
    grid = make_grid(2, 7, 8, H, W, align_corners, rng=0, dtype=dtype)
    for axis, size in ((0, W), (1, H)):
        shifted = grid[..., axis].ravel() + dtype(1)
        scale = Fraction(size - 1, 2) if align_corners else Fraction(size, 2)
        offset = Fraction(0) if align_corners else Fraction(1, 2)
        two_steps = shifted * dtype(scale) - dtype(offset)
        fused = np.array([float(Fraction(float(c)) * scale - offset) for c in shifted])
        near_kink = np.abs(2 * fused - np.round(2 * fused)) < 1e-4
        assert near_kink.sum() >= 10
        np.testing.assert_array_equal(two_steps[near_kink], fused.astype(dtype)[near_kink])


def test_make_grid_keeps_random_points_and_is_deterministic():
    grid = make_grid(1, 3, 4, 5, 6, rng=0)  # 12 points, far fewer than the special ones
    frac = pixel_coords(grid[..., 0], 6, False) % 0.5
    on_kink = np.isclose(frac, 0, atol=1e-12) | np.isclose(frac, 0.5, atol=1e-12)
    assert on_kink.sum() <= 6
    np.testing.assert_array_equal(grid, make_grid(1, 3, 4, 5, 6, rng=0))
    assert make_grid(1, 3, 4, 5, 6, rng=0, dtype=np.float32).dtype == np.float32


# ---------------------------------------------------------------------------------------
# The parity matrix
# ---------------------------------------------------------------------------------------


def test_torch_parity_matrix_float64():
    pytest.importorskip("torch", reason=TORCH_MISSING)
    results = parity_matrix()
    assert combos(results) == ALL_COMBOS and len(results) == 20
    assert [r.align_corners for r in results if r.op == "affine_grid"] == [True, False]
    failed = [(r.case, r.errors) for r in results if not r.passed]
    assert not failed
    assert max(r.max_error for r in results) <= 1e-10


def test_torch_parity_does_not_depend_on_cpu_kernel():
    # torch picks its CPU kernel at start-up: AVX2/AVX512 fuse multiply-adds, DEFAULT does
    # not. This process runs the native one (test above); a child runs the other kind.
    torch = pytest.importorskip("torch", reason=TORCH_MISSING)
    capability = "avx2" if torch.backends.cpu.get_cpu_capability() == "DEFAULT" else "default"
    code = ("import numpy as np, torch; from stn_numpy.verify import parity_matrix\n"
            "print(torch.backends.cpu.get_cpu_capability())\n"
            "for dtype in (np.float64, np.float32):\n"
            "    assert all(r.passed for r in parity_matrix(dtype=dtype))\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability,
           "PYTHONPATH": str(Path(verify.__file__).parents[2])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.strip().lower() != capability:
        pytest.skip(f"this CPU cannot run torch's {capability} kernels")


def test_torch_parity_matrix_float32():
    pytest.importorskip("torch", reason=TORCH_MISSING)
    results = parity_matrix(dtype=np.float32)
    assert all(r.tol == default_tol(np.float32) == 1e-5 for r in results)
    assert all(r.passed for r in results), format_table(results)


def test_own_sampler_as_callable_agrees_exactly():
    results = parity_matrix(ours)
    assert combos(results) == ALL_COMBOS and len(results) == 18  # no affine rows
    assert all(r.status == "PASS" and r.err_V == r.err_dU == r.err_dgrid == 0
               and r.err_adjoint < 1e-15 and r.repeat_diff == 0 for r in results)


@pytest.mark.parametrize(
    "wrong,expected_failures",
    [
        (flipped_align_corners, ALL_COMBOS),
        (perturbed_dgrid, ALL_COMBOS),
        (left_derivative_at_kinks, {c for c in ALL_COMBOS if c[0] == "bilinear"}),
    ],
)
def test_wrong_callables_are_caught(wrong, expected_failures):
    results = parity_matrix(wrong)
    assert combos([r for r in results if not r.passed]) == expected_failures


def test_callable_returning_wrong_shapes_or_raising_fails_its_rows():
    def transposed_V(U, grid, dV, mode, padding_mode, align_corners):
        V, dU, dgrid = ours(U, grid, dV, mode, padding_mode, align_corners)
        return V.transpose(0, 1, 3, 2), dU, dgrid

    def no_bicubic(U, grid, dV, mode, padding_mode, align_corners):
        if mode == "bicubic":
            raise KeyError(mode)
        return ours(U, grid, dV, mode, padding_mode, align_corners)

    rows = parity_matrix(transposed_V)
    assert {r.status for r in rows} == {"ERROR"}
    assert rows[0].failure == "ValueError: returned V of shape (2, 3, 8, 7), expected (2, 3, 7, 8)"
    assert {r.failure for r in parity_matrix(lambda *args: None)} == {
        "ValueError: must return (V, dU, dgrid), got NoneType"}
    rows = parity_matrix(no_bicubic)
    assert [r.status for r in rows] == ["PASS"] * 12 + ["ERROR"] * 6
    assert rows[-1].failure == "KeyError: 'bicubic'" and not rows[-1].passed
    table = format_table(rows)
    assert "bicubic/reflection/align_corners=False: KeyError: 'bicubic'" in table
    assert table.splitlines()[-1].startswith("12/18 cases")


def test_callable_that_writes_into_its_inputs_cannot_change_the_comparison():
    def scribbler(U, grid, dV, mode, padding_mode, align_corners):
        out = tuple(a.copy() for a in ours(U, grid, dV, mode, padding_mode, align_corners))
        U[...], grid[...], dV[...] = 0, 0, 0
        return out

    assert all(r.passed for r in parity_matrix(scribbler))


def test_rejects_bad_other_and_dtype():
    with pytest.raises(TypeError, match="other must be None, 'torch', one of scipy"):
        parity_matrix("tensorflow")
    with pytest.raises(TypeError, match="float32 or float64"):
        parity_matrix(ours, dtype=np.float16)


def test_missing_torch_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(TorchNotInstalledError, match=r"pip install torch==2\.13\.0"):
        parity_matrix()
    assert all(r.passed for r in parity_matrix(ours))  # a callable needs no torch


# ---------------------------------------------------------------------------------------
# ParityResult and the table
# ---------------------------------------------------------------------------------------


def test_parity_result_passes_only_within_tolerance():
    ok = ParityResult(mode="bilinear", padding_mode="zeros", align_corners=True, err_V=1e-12,
                      err_dU=0.0, err_dgrid=1e-10, tol=1e-10)
    assert ok.passed and ok.max_error == 1e-10 and ok.case == "bilinear/zeros/align_corners=True"
    assert set(ok.errors) == {"V", "dU", "dgrid"}
    nan = ParityResult(mode="nearest", padding_mode="border", align_corners=False,
                       err_V=np.nan, err_dU=0.0, err_dgrid=0.0, tol=1e-10)
    assert not nan.passed
    affine = ParityResult(op="affine_grid", mode=None, padding_mode=None, align_corners=False,
                          err_grid=0.0, err_dtheta=2e-10, tol=1e-10)
    assert not affine.passed and affine.case == "affine_grid/align_corners=False"
    with pytest.raises(AttributeError):
        ok.tol = 1.0  # frozen


def test_format_table_is_fixed_width_and_marks_failures():
    results = parity_matrix(perturbed_dgrid)[:3] + [
        ParityResult(op="affine_grid", mode=None, padding_mode=None, align_corners=True,
                     err_grid=0.0, err_dtheta=3e-17, tol=1e-10)]
    table = format_table(results)
    lines = table.splitlines()
    # header, rule, rows, rule, where each failing row's worst error is, summary
    assert len(lines) == 2 + len(results) + 1 + 3 + 1
    assert len({len(line) for line in lines[:2 + len(results) + 1]}) == 1
    assert lines[2].startswith("bilinear    zeros       True") and lines[2].endswith("FAIL")
    assert lines[5].startswith("affine_grid -") and lines[5].endswith("PASS")
    assert "3.0e-17" in lines[5] and lines[5].count(" - ") >= 3
    assert lines[-4].startswith("bilinear/zeros/align_corners=True: dgrid worst at dgrid[")
    assert "sampling point at pixel (x=" in lines[-2]
    assert lines[-1].startswith("1/4 cases within tol 1e-10; worst")
    assert format_table(results, tol=1.0).splitlines()[-1].startswith("4/4 cases within tol 1")


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An importable module holding a good and a bad implementation, as ``--other`` loads."""
    (tmp_path / "user_kernels.py").write_text(
        "import numpy as np\n"
        "from stn_numpy.verify import numpy_impl as good\n"
        "def bad(U, grid, dV, mode, padding_mode, align_corners):\n"
        "    return good(U, grid, dV, mode, padding_mode, not align_corners)\n"
        "def refuses(U, grid, dV, mode, padding_mode, align_corners):\n"
        "    raise ValueError(f'unsupported mode {mode!r}\\nsee the docs')\n"
        "def wrong_args(U, grid, dV):\n"
        "    return good(U, grid, dV, 'bilinear', 'zeros', False)\n"
        "def wrong_shape(U, grid, dV, mode, padding_mode, align_corners):\n"
        "    V, dU, dgrid = good(U, grid, dV, mode, padding_mode, align_corners)\n"
        "    return V[:, :1], dU, dgrid\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_kernels"


def test_main_export_and_check(tmp_path, capsys):
    path = tmp_path / "golden.npz"
    assert main(["verify", "--export", str(path), "--dtype", "float32"]) == 0
    assert load_golden(path)[0]["dtype"] == "float32"
    assert main(["verify", "--check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{N_GOLDEN_CASES}/{N_GOLDEN_CASES} cases within tol 1e-05" in out
    assert "affine_grid/align_corners=True" in out and "spatial_transformer" in out

    manifest, arrays = load_golden(path)
    arrays["nearest/zeros/align_corners=True/V"][0, 0, 0, 0] += 1
    rewrite_golden(path, arrays, manifest)
    assert main(["--check", str(path)]) == 1  # the subcommand name is optional
    out = capsys.readouterr().out
    assert "FAIL" in out and "nearest/zeros/align_corners=True: V worst at V[0, 0, 0, 0]" in out


@pytest.mark.parametrize("corrupt, message", [
    (lambda m, a: a.update({"bilinear/zeros/align_corners=True/U":
                            a["bilinear/zeros/align_corners=True/U"].astype(np.float32)}),
     "bilinear/zeros/align_corners=True/U: dtype float32, expected float64"),
    (lambda m, a: m.pop("tolerance"), "tolerance: must be a finite number > 0, got None"),
    (lambda m, a: m.update(tolerance="1e-10"), "tolerance: must be a finite number > 0"),
    (lambda m, a: a["nearest/border/align_corners=False/grid"].__setitem__((0, 1, 2, 0), np.nan),
     "nearest/border/align_corners=False/grid: input holds NaN or inf"),
])
def test_main_check_of_a_malformed_file_exits_2(tmp_path, capsys, corrupt, message):
    path = export_golden(tmp_path / "golden.npz")
    manifest, arrays = load_golden(path)
    corrupt(manifest, arrays)
    rewrite_golden(path, arrays, manifest)
    assert main(["verify", "--check", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and str(path) in captured.err


def test_main_with_user_callable(user_module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # a callable must not need torch
    assert main(["verify", "--other", f"{user_module}:good"]) == 0
    assert "stn_numpy vs numpy_impl (float64, seed 0)" in capsys.readouterr().out
    assert main(["verify", "--other", f"{user_module}:bad"]) == 1
    assert "0/18 cases" in capsys.readouterr().out


def test_main_errors_exit_2(tmp_path, user_module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["verify"]) == 2
    assert "PyTorch not installed: pip install torch==2.13.0" in capsys.readouterr().err
    assert main(["verify", "--check", str(tmp_path / "missing.npz")]) == 2
    # One line, prefixed as every command's errors, naming the path the user gave.
    assert capsys.readouterr().err == (f"stn-numpy verify: error: {tmp_path / 'missing.npz'}: "
                                       "No such file or directory\n")
    assert main(["verify", "--export", str(tmp_path / "no" / "g.npz")]) == 2
    assert capsys.readouterr().err == (f"stn-numpy verify: error: {tmp_path / 'no' / 'g.npz'}: "
                                       "No such file or directory\n")
    assert main(["verify", "--other", "no_colon"]) == 2
    assert ("must be one of torch, scipy, jax, opencv, skimage, onnxruntime, onnx-reference "
            "or look like") in capsys.readouterr().err
    assert main(["verify", "--against", "tensorflow"]) == 2
    assert "no adapter; tf.raw_ops.ImageProjectiveTransformV3" in capsys.readouterr().err
    assert main(["verify", "--other", f"{user_module}:absent"]) == 2
    assert "has no 'absent'" in capsys.readouterr().err
    assert main(["verify", "--export", str(tmp_path / "g.npz"),
                 "--other", f"{user_module}:good"]) == 2
    assert "--export takes no --against" in capsys.readouterr().err
    assert not (tmp_path / "g.npz").exists()
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--dtype", "float16"])
    assert exc.value.code == 2


@pytest.mark.parametrize("name, message", [
    ("refuses", "ValueError: unsupported mode 'bilinear' see the docs"),
    ("wrong_args", "TypeError: wrong_args() takes 3 positional arguments but 6 were given"),
    ("wrong_shape", "ValueError: returned V of shape (2, 1, 7, 8), expected (2, 3, 7, 8)"),
])
def test_main_user_callable_that_raises_fails_each_row_with_its_message(
        tmp_path, user_module, capsys, name, message):
    assert main(["verify", "--against", f"{user_module}:{name}"]) == 1
    captured = capsys.readouterr()
    nothing = "stn-numpy verify: nothing was compared (every case N/A or ERROR)\n"
    assert captured.err == nothing and "Traceback" not in captured.out
    assert f"bilinear/zeros/align_corners=True: {message}\n" in captured.out
    assert captured.out.count(" ERROR\n") == 18 and "0/18 cases" in captured.out
    golden = export_golden(tmp_path / "g.npz")
    assert main(["verify", "--check", str(golden), "--against", f"{user_module}:{name}"]) == 1
    assert capsys.readouterr().err == nothing


@pytest.mark.parametrize("seed", ["-1", "1.5", "x"])
def test_main_rejects_a_seed_that_is_not_a_non_negative_int(seed, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--export", "never-written.npz", f"--seed={seed}"])
    assert exc.value.code == 2
    assert "--seed: expected a non-negative integer, got" in capsys.readouterr().err


@pytest.mark.parametrize("tol", ["0", "-1e-5", "nan", "tiny"])
def test_main_rejects_a_tolerance_that_is_not_positive(tol, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--other", "stn_numpy.verify:numpy_impl", f"--tol={tol}"])
    assert exc.value.code == 2
    assert "argument --tol: must be a number > 0" in capsys.readouterr().err


def test_bench_and_verify_share_one_torch_import():
    from stn_numpy import _torch, bench

    assert verify.import_torch is bench.import_torch is _torch.import_torch
    assert TorchNotInstalledError is _torch.TorchNotInstalledError


def test_main_against_torch(capsys):
    pytest.importorskip("torch", reason=TORCH_MISSING)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stn_numpy vs torch 2.") and "20/20 cases within tol 1e-10" in out
    assert main(["verify", "--against", "torch", "--dtype", "float32"]) == 0


def test_runs_as_module(tmp_path):
    path = tmp_path / "golden.npz"
    export_golden(path)
    env = {**os.environ, "PYTHONPATH": str(Path(verify.__file__).parents[2])}
    proc = subprocess.run([sys.executable, "-m", "stn_numpy.verify", "--check", str(path)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"{N_GOLDEN_CASES}/{N_GOLDEN_CASES} cases" in proc.stdout


_ODD_CALLABLES = (
    "import sys\n"
    "import numpy as np\n"
    "from stn_numpy.verify import Unsupported, numpy_impl as good\n"
    "def complex_(*a):\n"
    "    V, dU, dgrid = good(*a)\n"
    "    return V + 1j, dU, dgrid\n"
    "def exits(*a):\n"
    "    sys.exit(0)\n"
    "def unsupported(*a):\n"
    "    raise Unsupported('nothing here')\n"
    "def strings(*a):\n"
    "    V, dU, dgrid = good(*a)\n"
    "    return V.astype(str), dU, dgrid\n"
    "def objects(*a):\n"
    "    V, dU, dgrid = good(*a)\n"
    "    return V.astype(object), dU, dgrid\n"
    "def huge_ints(*a):\n"
    "    V, dU, dgrid = good(*a)\n"
    "    return np.full(V.shape, 10**400, dtype=object), dU, dgrid\n"
    "def coin(*a):\n"
    "    V, dU, dgrid = good(*a)\n"
    "    return np.random.random(V.shape) < 0.5, dU, dgrid\n"
    "def raising_errors(*a):\n"
    "    np.seterr(all='raise')\n"
    "    return good(*a)\n"
    "def not_a_tuple(*a):\n"
    "    return 'V, dU, dgrid'\n"
)


@pytest.mark.parametrize("name, status", [
    ("complex_", "ERROR"), ("exits", "ERROR"), ("strings", "ERROR"), ("objects", "ERROR"),
    ("huge_ints", "ERROR"), ("coin", "FAIL"), ("raising_errors", "PASS"),
    ("not_a_tuple", "ERROR"), ("unsupported", "N/A"),
])
def test_odd_callables_are_rows_never_a_pass_without_evidence(tmp_path, monkeypatch, capsys,
                                                              name, status):
    (tmp_path / "odd_kernels.py").write_text(_ODD_CALLABLES)
    monkeypatch.chdir(tmp_path)  # found in the current folder, as `python -m` would
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    before = np.geterr()
    code = main(["verify", "--against", f"odd_kernels:{name}"])
    captured = capsys.readouterr()
    assert np.geterr() == before and "Traceback" not in captured.err
    assert captured.out.count(f" {status}\n") == 18, captured.out
    assert code == (0 if status == "PASS" else 1)
    if status in ("ERROR", "N/A"):
        assert "nothing was compared" in captured.err
