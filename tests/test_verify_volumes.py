"""Tests for stn_numpy.verify.volumes: the 3-D parity matrix against PyTorch and the
libraries that sample volumes, its inputs, ``verify --dims 3`` and the atlas's 3-D rows."""

import numpy as np
import pytest

from stn_numpy.sampling import PADDING_MODES
from stn_numpy.verify import atlas, format_table, main, parity_matrix_3d
from stn_numpy.verify.adapters import ADAPTERS
from stn_numpy.verify.parity import pixel_coordinates, special_coords
from stn_numpy.verify.volumes import COMBOS_3D, make_volume_grid

TORCH_MISSING = "PyTorch not installed: pip install torch==2.13.0"


def need(name):
    pytest.importorskip(ADAPTERS[name].module,
                        reason=f"{ADAPTERS[name].pip_name} not installed: pip install -e "
                               f"\".[verify]\"")


@pytest.mark.parametrize("shape,out", [
    ((2, 2, 4, 5, 6), (5, 6, 7)),
    ((1, 1, 1, 1, 1), (4, 5, 6)),  # 1-voxel axes
    ((2, 1, 1, 9, 2), (3, 4, 9)),  # elongated
    ((1, 2, 7, 1, 3), (6, 2, 9)),
])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_parity_matrix_3d_against_torch(shape, out, dtype):
    pytest.importorskip("torch", reason=TORCH_MISSING)
    rows = parity_matrix_3d(dtype=dtype, shape=shape, out_dhw=out)
    assert len(rows) == 12 + 2
    assert all(r.status == "PASS" for r in rows), format_table(rows)
    assert rows[0].case == "3d/bilinear/zeros/align_corners=True"
    assert rows[-1].case == "3d/affine_grid/align_corners=False"
    if dtype == np.float64:
        assert max(r.max_error for r in rows) < 1e-14


def test_a_swapped_axis_order_fails_the_3d_matrix():
    # The grid read as (z, y, x) instead of (x, y, z): kornia's 3-D warp mistake.
    from stn_numpy.verify import numpy_impl

    def swapped(U, grid, dV, mode, padding_mode, align_corners):
        return numpy_impl(U, np.ascontiguousarray(grid[..., ::-1]), dV, mode, padding_mode,
                          align_corners)

    rows = parity_matrix_3d(swapped)
    assert all(r.status == "FAIL" for r in rows)
    assert "sampling point at voxel (x=" in format_table(rows)


def test_volume_grid_hits_the_kinks_of_every_axis():
    D, H, W, ac = 4, 5, 6, False
    grid = make_volume_grid(2, 5, 6, 7, D, H, W, ac, rng=0)
    assert grid.shape == (2, 5, 6, 7, 3)
    for a, size in enumerate((W, H, D)):
        specials = set(special_coords(size, ac, np.dtype(np.float64)).values())
        hits = {float(v) for v in grid[..., a].ravel()} & {float(v) for v in specials}
        assert len(hits) == len(specials)
        pixels = pixel_coordinates(grid[..., a], size, ac)[0]
        assert (pixels % 1 == 0.5).any() and (pixels < 0).any() and (pixels > size - 1).any()


@pytest.mark.parametrize("name", ["scipy", "jax"])
def test_libraries_that_sample_volumes_in_the_3d_matrix(name):
    # Their bilinear settings reproduce trilinear sampling; SciPy's nearest rounds ties up,
    # JAX's autodiff has no zero-gradient zone at border and reflection clip limits.
    need(name)
    rows = parity_matrix_3d(name)
    assert len(rows) == 12
    for r, (mode, padding_mode, _) in zip(rows, COMBOS_3D, strict=True):
        passes = mode == "bilinear" and (name == "scipy" or padding_mode == "zeros")
        assert r.status == ("PASS" if passes else "FAIL"), r.case


@pytest.mark.parametrize("name", ["opencv", "skimage"])
def test_image_only_adapters_say_so_for_volumes(name):
    need(name)
    assert {r.status for r in parity_matrix_3d(name)} == {"N/A"}


def test_atlas_volume_rows_of_scipy():
    need("scipy")
    rows = atlas.measure("scipy", volumes=True)
    exact = {(r.setting, r.padding_mode) for r in rows if r.exact}
    assert exact == {("order=1, mode='grid-constant'", "zeros"),
                     ("order=1, mode='nearest'", "border"),
                     ("order=1, mode='mirror'", "reflection"),
                     ("order=1, mode='reflect'", "reflection")}
    ties = [r for r in rows if r.setting.startswith("order=0") and "constant'" not in r.setting]
    assert all("half-pixel ties" in r.where and "outside" not in r.where for r in ties)
    assert {r.padding_mode for r in rows} == set(PADDING_MODES)


def test_main_dims_3(capsys):
    pytest.importorskip("torch", reason=TORCH_MISSING)
    assert main(["verify", "--dims", "3"]) == 0
    out = capsys.readouterr().out
    assert "volumes" in out.splitlines()[0] and "14/14 cases within tol 1e-10" in out
    assert main(["verify", "--dims", "3", "--export", "x.npz"]) == 2
    assert "--dims applies to the parity table only" in capsys.readouterr().err
