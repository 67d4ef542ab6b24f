"""Tests for the adapters of stn_numpy.verify and the atlas they produce.

Each library test skips with a reason when the library is absent
(``pip install -e ".[verify]"`` installs them all, ``".[onnx]"`` the two ONNX runtimes).
"""

import sys

import numpy as np
import pytest

from stn_numpy.verify import LibraryNotInstalledError, atlas, format_table, main, parity_matrix
from stn_numpy.verify.adapters import ADAPTERS

MISSING = {name: f"{a.pip_name} not installed: pip install -e \".[{a.extra}]\""
           for name, a in ADAPTERS.items()}


def need(name):
    pytest.importorskip(ADAPTERS[name].module, reason=MISSING[name])


def statuses(rows):
    return {(r.mode, r.padding_mode, r.align_corners): r.status for r in rows}


# What each library reproduces, measured (see the atlas page, docs/atlas.md): the rows that
# pass, the rows it cannot express (N/A); every other row fails.
EXPECTED_PASS = {
    "scipy": lambda m, p, a: m == "bilinear",
    "skimage": lambda m, p, a: m == "bilinear",
    "jax": lambda m, p, a: m == "bilinear" and (p == "zeros" or (p, a) == ("border", False)),
    "opencv": lambda m, p, a: m == "nearest",
    "onnxruntime": lambda m, p, a: True,
    # float32 pixel coordinates: only nearest is exact in float64
    "onnx-reference": lambda m, p, a: m == "nearest",
}


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_rows_in_float64(name):
    need(name)
    rows = parity_matrix(name)
    for (m, p, a), status in statuses(rows).items():
        if name in ("scipy", "jax", "skimage") and m == "bicubic":
            assert status == "N/A", (m, p, a)
        elif EXPECTED_PASS[name](m, p, a):
            assert status == "PASS", (m, p, a, format_table(rows))
        else:
            assert status == "FAIL", (m, p, a, format_table(rows))


def test_onnx_runtimes_in_float32():
    # ONNX Runtime matches every row; the reference evaluator all but bicubic with border,
    # where it clamps the point before taking the 16 taps, so only points outside differ.
    need("onnxruntime")
    need("onnx-reference")
    rows = parity_matrix("onnxruntime", dtype=np.float32)
    assert all(r.status == "PASS" for r in rows), format_table(rows)
    rows = parity_matrix("onnx-reference", dtype=np.float32)
    failed = {(r.mode, r.padding_mode) for r in rows if r.status == "FAIL"}
    assert failed == {("bicubic", "border")}, format_table(rows)
    assert all("y=-" in r.where["V"] or "x=-" in r.where["V"] or "x=5." in r.where["V"]
               or "y=4." in r.where["V"] for r in rows if r.status == "FAIL")


def test_onnx_opset_16_graphs():
    # Opset 16 names the modes bilinear and bicubic: ONNX Runtime runs them in float32 (no
    # float64 kernel there), the reference evaluator knows opset 20's names only.
    need("onnxruntime")
    from stn_numpy.verify.adapters import onnx_sample
    from stn_numpy.verify.common import Unsupported
    from stn_numpy.verify.parity import numpy_impl, sampler_inputs

    for dtype in (np.float32, np.float64):
        for mode in ("bilinear", "bicubic"):
            U, grid, dV = sampler_inputs(0, 1, (2, 3, 5, 6), (7, 8), False, dtype)
            run = lambda runtime, m=mode, U=U, grid=grid: onnx_sample(  # noqa: E731
                U, grid, False, runtime=runtime, mode=m, padding_mode="reflection", opset=16)
            with pytest.raises(Unsupported, match="onnx.reference rejects opset 16"):
                run("onnx-reference")
            if dtype == np.float64:
                with pytest.raises(Unsupported, match="no float64 GridSample kernel"):
                    run("onnxruntime")
                continue
            ours = numpy_impl(U, grid, dV, mode, "reflection", False)[0]
            np.testing.assert_allclose(run("onnxruntime"), ours, rtol=0, atol=1e-5)


def test_atlas_rows_of_the_onnx_runtimes():
    need("onnxruntime")
    rows = {r.setting: r for r in atlas.measure("onnx-reference")}
    assert len(rows) == 15  # 9 at opset 20, 6 at opset 16 (the renamed modes)
    cubic_border = rows["opset 20, mode='cubic', padding_mode='border'"]
    assert not cubic_border.exact and cubic_border.err32 > 1e-2
    assert rows["opset 20, mode='nearest', padding_mode='zeros'"].exact
    refused = rows["opset 16, mode='bilinear', padding_mode='zeros'"]
    assert refused.err64 is None and set(refused.refused) == {"float32", "float64"}
    ort_rows = atlas.measure("onnxruntime")
    assert all(r.exact for r in ort_rows if r.setting.startswith("opset 20"))
    assert all(set(r.refused) == {"float64"} and r.err32 <= 1e-5
               for r in ort_rows if r.setting.startswith("opset 16"))
    text = atlas.build_atlas(["onnxruntime"])
    assert "| not run | round-off |" in text and "(differs)" not in text


def test_opencv_float32_images_are_exact_up_to_round_off():
    need("opencv")
    rows = parity_matrix("opencv", dtype=np.float32)
    assert all(r.status == "PASS" for r in rows), format_table(rows)


def test_scipy_and_jax_nearest_differ_exactly_at_ties():
    need("jax")
    for name in ("scipy", "jax"):
        rows = [r for r in parity_matrix(name) if r.mode == "nearest"]
        assert all("x=4.5" in r.where["V"] or "y=4.5" in r.where["V"]
                   or ".5," in r.where["V"] or ".5)" in r.where["V"] for r in rows)


@pytest.mark.parametrize("name", ADAPTERS)
def test_missing_library_names_the_extra(name, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, ADAPTERS[name].module.split(".")[0], None)
    monkeypatch.setitem(sys.modules, ADAPTERS[name].module, None)
    extra = ADAPTERS[name].extra
    with pytest.raises(LibraryNotInstalledError, match=rf'pip install -e "\.\[{extra}\]"'):
        parity_matrix(name)
    assert main(["verify", "--against", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"stn-numpy verify: error: {ADAPTERS[name].pip_name} not installed: "
                          "pip install ")


def test_main_against_a_library(capsys):
    need("skimage")
    assert main(["verify", "--against", "skimage"]) == 1  # nearest ties differ
    out = capsys.readouterr().out
    assert out.startswith("stn_numpy vs skimage (float64, seed 0)")
    assert "6/12 cases within tol 1e-10" in out and "6 not expressible" in out


def test_main_against_onnxruntime(capsys):
    need("onnxruntime")
    assert main(["verify", "--against", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stn_numpy vs onnxruntime (float64, seed 0)")
    assert "18/18 cases within tol 1e-10" in out


def test_atlas_rows_and_markdown():
    need("scipy")
    rows = {r.setting: r for r in atlas.measure("scipy")}
    assert len(rows) == 10
    assert rows["order=1, mode='grid-constant'"].exact
    assert rows["order=1, mode='mirror'"].exact and rows["order=1, mode='mirror'"].align_corners
    ties = rows["order=0, mode='nearest'"]
    assert not ties.exact and ties.where.startswith("V: ") and ties.where.endswith(
        "half-pixel ties 4")
    outside = rows["order=1, mode='constant'"]
    assert not outside.exact and "outside" in outside.where
    text = atlas.build_atlas(["scipy"])
    # The 2-D table, then the same settings measured on volumes.
    assert text.count("\n| `order=") == 10 + 10 and "(scipy " in text
    assert "**SciPy `ndimage.map_coordinates`** on volumes (5-D)" in text


def test_write_atlas_replaces_only_its_section(tmp_path, monkeypatch):
    monkeypatch.setattr(atlas, "build_atlas", lambda libraries=None: "TABLE\n")
    path = tmp_path / "README.md"
    path.write_text(f"# t\n\nbefore\n{atlas.START}\nold\n{atlas.END}\nafter\n")
    atlas.write_atlas(path)
    assert path.read_text() == f"# t\n\nbefore\n{atlas.START}\nTABLE\n{atlas.END}\nafter\n"
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs one"):
        atlas.write_atlas(path)
    assert main(["verify", "--atlas", str(path)]) == 2
    assert main(["verify", "--atlas", str(tmp_path / "missing.md")]) == 2
    assert path.read_text() == "no markers\n"


def test_committed_atlas_is_current():
    # The atlas page's table is what `stn-numpy verify --atlas docs/atlas.md` writes, when
    # every library it lists is installed here.
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "atlas.md").read_text()
    committed = readme.split(atlas.START)[1].split(atlas.END)[0].lstrip("\n")
    for name, (_, module, _) in atlas.LIBRARIES.items():
        pytest.importorskip(module, reason=MISSING[name])
    def unversioned(text):  # another patch release may differ in nothing else
        return re.sub(r"\(([\w-]+) [^)]*\)", r"(\1)", text)

    assert unversioned(committed) == unversioned(atlas.build_atlas())


# JAX is left out: it compiles once per shape and setting, 18 s here for the edge cases.
@pytest.mark.parametrize("name", ["scipy", "opencv", "skimage", "onnxruntime",
                                  "onnx-reference"])
def test_every_adapter_gets_through_the_golden_edge_cases(name, tmp_path):
    # One-pixel axes, coordinates 1e6 pixels out, ties: a library that hangs or crashes
    # on one of them must show N/A or FAIL for that row, never stop the check.
    need(name)
    from stn_numpy.verify import check_against_golden, export_golden

    rows = check_against_golden(export_golden(tmp_path / "golden.npz"), name)
    assert len(rows) == 18 + 84 + 24 and any(r.case.startswith("edge/width_1/") for r in rows)
    if name == "opencv":  # images only: every volume case is N/A too
        assert {r.case for r in rows if r.status == "N/A"} == {
            "edge/height_1/bicubic/reflection/align_corners=True",
            "edge/width_1/bicubic/reflection/align_corners=True"} | {
            r.case for r in rows if r.case.startswith("3d/")}
    if name == "onnxruntime":
        # Its nearest rounds the point before reflecting it; PyTorch reflects, then rounds.
        assert [r.case for r in rows if not r.passed] == [
            "edge/nearest_ties/nearest/reflection/align_corners=False"]
    if name == "onnx-reference":
        # _gs_reflect divides by the axis' extent, 0 for one pixel with align_corners=True.
        assert {r.case for r in rows if r.status == "ERROR"} == {
            f"edge/{axis}_1/{mode}/reflection/align_corners=True"
            for axis in ("height", "width") for mode in ("bilinear", "bicubic")}
