"""Tests for stn_numpy.verify.golden: golden vectors, their manifest and their checks."""

import io
import json
import os
import stat
import zipfile

import numpy as np
import pytest

from stn_numpy import affine_grid, grid_sample
from stn_numpy.verify import (
    GoldenFormatError,
    check_against_golden,
    default_tol,
    export_golden,
    load_golden,
    numpy_impl,
    pixel_coordinates,
)

N_CASES = 18 + 84 + 8 + 1 + 26 + 18 + 12  # 2-D samplers, edge cases, grids, a layer;
# volumes; the double backward of images and of volumes
N_SAMPLER_CASES = 18 + 84 + 24


def rewrite_golden(path, arrays, manifest):
    with open(path, "wb") as f:
        np.savez(f, manifest=np.frombuffer(json.dumps(manifest).encode(), np.uint8), **arrays)


def flipped_align_corners(U, grid, dV, mode, padding_mode, align_corners):
    return numpy_impl(U, grid, dV, mode, padding_mode, not align_corners)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return export_golden(tmp_path_factory.mktemp("golden") / "golden.npz")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_golden_roundtrip(tmp_path, dtype):
    path = tmp_path / "golden.npz"
    assert export_golden(path, seed=4, dtype=dtype) == path
    assert sorted(os.listdir(tmp_path)) == ["golden.json", "golden.npz"]  # no temporary files
    manifest, arrays = load_golden(path)
    assert json.loads((tmp_path / "golden.json").read_text()) == manifest
    assert manifest["dtype"] == np.dtype(dtype).name and manifest["seed"] == 4
    assert manifest["tolerance"] == default_tol(dtype) and "measured" in manifest["tolerance_note"]
    assert manifest["stn_numpy_version"] == __import__("stn_numpy").__version__
    assert set(manifest["arrays"]) == set(arrays) and len(manifest["cases"]) == N_CASES
    assert all(manifest["arrays"][k]["shape"] == list(a.shape) for k, a in arrays.items())
    prefix = "bicubic/reflection/align_corners=False"
    assert arrays[f"{prefix}/U"].shape == (2, 3, 5, 6)
    assert arrays[f"{prefix}/grid"].shape == arrays[f"{prefix}/dgrid"].shape == (2, 7, 8, 2)
    assert arrays[f"{prefix}/V"].dtype == dtype
    assert arrays["affine_grid/align_corners=True/size"].tolist() == [2, 3, 7, 8]
    assert arrays["tps_grid/align_corners=False/theta"].shape == (2, 9, 2)
    assert arrays["spatial_transformer/loss"].shape == ()
    results = check_against_golden(path)
    assert len(results) == N_CASES and all(r.status == "PASS" for r in results)
    assert all(e == 0 for r in results for k, e in r.errors.items() if k != "adjoint")
    sampler_rows = check_against_golden(path, numpy_impl)
    assert len(sampler_rows) == N_SAMPLER_CASES and all(r.passed for r in sampler_rows)


def test_edge_cases_are_what_they_claim(golden):
    _, arrays = load_golden(golden)
    for ac in (True, False):
        key = f"edge/height_1/bilinear/zeros/align_corners={ac}"
        assert arrays[f"{key}/U"].shape[2] == 1
        assert arrays[f"edge/width_1/bilinear/zeros/align_corners={ac}/U"].shape[3] == 1
        key = f"edge/identity/bilinear/border/align_corners={ac}"
        np.testing.assert_allclose(arrays[f"{key}/V"], arrays[f"{key}/U"], atol=1e-12)
        grid = arrays[f"edge/far_reflection/bilinear/reflection/align_corners={ac}/grid"]
        x = pixel_coordinates(grid[..., 0], 6, ac)[0]
        assert np.abs(x).max() == pytest.approx(1e6, rel=1e-6)
        grid = arrays[f"edge/nearest_ties/nearest/zeros/align_corners={ac}/grid"]
        x = pixel_coordinates(grid[..., 0], 6, ac)[0]
        assert np.mean(x % 1 == 0.5) > 0.5  # most ties are exact in float64
        grid = arrays[f"edge/on_border/bilinear/border/align_corners={ac}/grid"]
        x = pixel_coordinates(grid[..., 0], 6, ac)[0]
        y = pixel_coordinates(grid[..., 1], 5, ac)[0]
        # within an ulp: pixel 0 of a 6-pixel axis is reachable exactly by no float
        on_x = np.isclose(x, 0, atol=1e-15) | (x == 5)
        on_y = np.isclose(y, 0, atol=1e-15) | (y == 4)
        assert on_x.mean() > 0.5 and on_y.mean() > 0.5


def test_spatial_transformer_case_is_the_documented_layer(golden):
    _, a = load_golden(golden)
    p = {k.split("/", 1)[1]: v for k, v in a.items() if k.startswith("spatial_transformer/")}
    hidden = np.maximum(p["U"].reshape(2, -1) @ p["localization.1.weight"].T
                        + p["localization.1.bias"], 0)
    theta = (hidden @ p["localization.3.weight"].T + p["localization.3.bias"]).reshape(2, 2, 3)
    np.testing.assert_allclose(p["theta"], theta, rtol=1e-12)
    V = grid_sample(p["U"], affine_grid(theta, p["U"].shape))
    np.testing.assert_allclose(p["V"], V, rtol=1e-12)
    assert p["loss"] == pytest.approx(np.sum(V * p["dV"]), rel=1e-12)
    # d loss / d b2 through the sampler path, by central differences on one entry
    eps, b = 1e-6, p["localization.3.bias"].copy()
    losses = []
    for sign in (1, -1):
        b2 = b.copy()
        b2[2] += sign * eps
        t = (hidden @ p["localization.3.weight"].T + b2).reshape(2, 2, 3)
        losses.append(np.sum(grid_sample(p["U"], affine_grid(t, p["U"].shape)) * p["dV"]))
    assert p["dlocalization.3.bias"][2] == pytest.approx((losses[0] - losses[1]) / (2 * eps),
                                                         rel=1e-6)


def test_golden_file_is_plain_npy_in_an_uncompressed_zip(golden):
    # What a C++ reader relies on: stored entries, standard .npy payloads, JSON manifest.
    with zipfile.ZipFile(golden) as z:
        infos = z.infolist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        assert "bilinear/zeros/align_corners=True/V.npy" in z.namelist()
        with z.open("manifest.npy") as f:
            raw = np.lib.format.read_array(f, allow_pickle=False)
        with z.open("nearest/border/align_corners=False/grid.npy") as f:
            grid = np.lib.format.read_array(f, allow_pickle=False)
    assert raw.dtype == np.uint8 and raw.ndim == 1
    manifest = json.loads(raw.tobytes().decode("utf-8"))
    assert manifest["format"] == "stn-numpy-golden" and manifest["format_version"] == 3
    assert "align_corners" in manifest["conventions"]["unnormalize"]
    assert len(infos) == len(manifest["arrays"]) + 1
    assert grid.dtype == np.dtype("<f8") and grid.flags.c_contiguous
    case = manifest["cases"][0]
    assert case == {"key": "bilinear/zeros/align_corners=True", "kind": "grid_sample",
                    "mode": "bilinear", "padding_mode": "zeros", "align_corners": True,
                    "inputs": ["U", "grid", "dV"], "outputs": ["V", "dU", "dgrid"]}


def test_export_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "golden.npz"
    path.write_bytes(b"previous")

    def failing_savez(f, **arrays):
        f.write(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(RuntimeError, match="disk full"):
        export_golden(path)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["golden.npz"]
    monkeypatch.undo()
    export_golden(path)
    assert sorted(os.listdir(tmp_path)) == ["golden.json", "golden.npz"]
    assert load_golden(path)[0]["seed"] == 0


def test_golden_file_is_readable_by_others_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        path = export_golden(tmp_path / "golden.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.with_suffix(".json").stat().st_mode) == 0o644


def test_check_against_golden_catches_changes(tmp_path, golden):
    bad = check_against_golden(golden, flipped_align_corners)
    # A 1-pixel axis with align_corners=True maps every coordinate to 0 either way, and
    # the identity grid lands on pixel centres in both conventions for some cases.
    assert sum(not r.passed for r in bad) > 60

    path = tmp_path / "golden.npz"
    manifest, arrays = load_golden(golden)
    arrays["bicubic/zeros/align_corners=True/dgrid"][0, 3, 2, 1] += 1e-6
    arrays["projective_grid/align_corners=False/dtheta"][1, 5] += 1e-6
    arrays["spatial_transformer/dlocalization.1.weight"][3, 7] += 1e-6
    rewrite_golden(path, arrays, manifest)
    failed = [r.case for r in check_against_golden(path) if not r.passed]
    assert failed == ["bicubic/zeros/align_corners=True", "projective_grid/align_corners=False",
                      "spatial_transformer"]


def _tweak(golden, tmp_path, change):
    path = tmp_path / "bad.npz"
    manifest, arrays = load_golden(golden)
    change(manifest, arrays)
    rewrite_golden(path, arrays, manifest)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda m, a: a.__setitem__("nearest/zeros/align_corners=True/dV",
                                a["nearest/zeros/align_corners=True/dV"].astype(np.float32)),
     r"nearest/zeros/align_corners=True/dV: dtype float32, expected float64"),
    (lambda m, a: a.__setitem__("bilinear/border/align_corners=False/V",
                                a["bilinear/border/align_corners=False/V"][:, :, :6]),
     r"bilinear/border/align_corners=False/V: shape \(2, 3, 6, 8\) differs from the "
     r"manifest's \[2, 3, 7, 8\]"),
    (lambda m, a: (a.__setitem__("bilinear/border/align_corners=False/V",
                                 a["bilinear/border/align_corners=False/V"][:, :, :6]),
                   m["arrays"]["bilinear/border/align_corners=False/V"].update(shape=[2, 3, 6, 8])),
     r"bilinear/border/align_corners=False/V: shape \(2, 3, 6, 8\), expected \(2, 3, 7, 8\)"),
    (lambda m, a: a["edge/identity/bicubic/zeros/align_corners=True/U"].__setitem__(
        (0, 0, 0, 0), np.nan), "edge/identity/bicubic/zeros/align_corners=True/U: input holds"),
    (lambda m, a: m.pop("tolerance"), "tolerance: must be a finite number > 0, got None"),
    (lambda m, a: m.update(tolerance="1e-10"), "tolerance: must be a finite number > 0, got '1e"),
    (lambda m, a: m.update(tolerance=True), "tolerance: must be a finite number > 0, got True"),
    (lambda m, a: m.update(dtype="float16"), "dtype: is 'float16', expected float32 or float64"),
    (lambda m, a: m["cases"][3].update(mode="lanczos"),
     r"cases\[3\] \(bilinear/border/align_corners=False\): unknown mode"),
    (lambda m, a: m["cases"].append({"key": "x"}),
     rf"cases\[{N_CASES}\]: needs a 'key' and a 'kind'"),
    (lambda m, a: m["cases"][0].update(outputs=["V"]), r"cases\[0\] .* inputs and outputs"),
    (lambda m, a: m["arrays"].pop("affine_grid/align_corners=True/theta"),
     "arrays: no entry for 'affine_grid/align_corners=True/theta'"),
    (lambda m, a: a.pop("affine_grid/align_corners=True/theta"),
     "affine_grid/align_corners=True/theta: is in the manifest but has no array"),
    (lambda m, a: m.update(format="something-else"), "format: is 'something-else'"),
    (lambda m, a: m.update(format_version=1), "format_version: is 1, this reader knows 2 and 3"),
    (lambda m, a: m["cases"][102].pop("align_corners"),
     r"cases\[102\] \(affine_grid/align_corners=True\): align_corners must be true or false, "
     r"got None"),
    (lambda m, a: m["cases"][110].update(mode="nearest"),
     r"cases\[110\] \(spatial_transformer\): settings .*'mode': 'nearest'.*, expected"),
    # Values and shapes that would make the forward allocate far more than the file holds,
    # or raise inside this package's own functions, are format errors too.
    (lambda m, a: a.__setitem__("affine_grid/align_corners=True/size",
                                np.array([2, 3, 100000, 100000])),
     r"affine_grid/align_corners=True/size: is \[2, 3, 100000, 100000\], expected \[2, C"),
    (lambda m, a: [(a.__setitem__(f"attention_grid/align_corners=True/{n}", np.zeros((2, 4))),
                    m["arrays"][f"attention_grid/align_corners=True/{n}"].update(shape=[2, 4]))
                   for n in ("theta", "dtheta")],
     r"attention_grid/align_corners=True/theta: shape \(2, 4\), expected \(2, 3\)"),
    (lambda m, a: [c.update(lattice="ab") for c in m["cases"] if c["kind"] == "tps_grid"],
     r"tps_grid/align_corners=True: lattice: lattice\[0\] must be an int >= 2, got 'a'"),
    (lambda m, a: [(a.__setitem__(f"spatial_transformer/{n}", np.zeros(5)),
                    m["arrays"][f"spatial_transformer/{n}"].update(shape=[5]))
                   for n in ("localization.3.bias", "dlocalization.3.bias")],
     r"spatial_transformer/localization.3.bias: shape \(5,\), expected \(6,\)"),
])
def test_load_golden_checks_every_field(golden, tmp_path, change, message):
    path = _tweak(golden, tmp_path, change)
    with pytest.raises(GoldenFormatError, match=message) as exc:
        load_golden(path)
    assert str(exc.value).startswith(f"{path}: ")
    assert isinstance(exc.value, ValueError)


def test_a_header_declaring_terabytes_is_refused_before_reading(golden, tmp_path):
    path = tmp_path / "huge.npz"
    key = "bilinear/zeros/align_corners=True/U"
    with zipfile.ZipFile(golden) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if info.filename == f"{key}.npy":
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(header, {
                    "descr": "<f8", "fortran_order": False, "shape": (2, 3, 10**6, 10**6)})
                dst.writestr(info.filename, header.getvalue() + b"\0" * 64)
            else:
                dst.writestr(info, src.read(info))
    with pytest.raises(GoldenFormatError, match=rf"{key}.npy: declares a float64 array of "
                                                 r"shape \(2, 3, 1000000, 1000000\) "
                                                 r"\(48000000000000 bytes\) but stores \d+"):
        load_golden(path)


def test_load_golden_rejects_other_files(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(GoldenFormatError, match="no 'manifest' entry"):
        load_golden(path)
    np.savez(path, manifest=np.zeros(3))
    with pytest.raises(GoldenFormatError, match="manifest: must be 1-D uint8"):
        load_golden(path)
    np.savez(path, manifest=np.frombuffer(b"[1, 2]", np.uint8))
    with pytest.raises(GoldenFormatError, match="manifest: is not a JSON object"):
        load_golden(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(GoldenFormatError, match="not a readable .npz"):
        load_golden(path)
    with pytest.raises(FileNotFoundError):
        load_golden(tmp_path / "missing.npz")


def test_volume_cases_hold_5d_arrays_and_check(golden):
    manifest, arrays = load_golden(golden)
    volume = [c for c in manifest["cases"] if c.get("dims") == 3]
    first, second = volume[:26], volume[26:]
    assert all(c["key"].startswith("3d/") for c in first)
    assert len(second) == 12 and all(c["key"].startswith("second_order/3d/") for c in second)
    key = "second_order/3d/bilinear/border/align_corners=True"
    assert arrays[f"{key}/ddU"].shape == arrays[f"{key}/d_U"].shape == (2, 2, 3, 4, 5)
    assert arrays[f"{key}/ddgrid"].shape == arrays[f"{key}/d_grid"].shape == (2, 4, 5, 6, 3)
    key = "3d/bilinear/reflection/align_corners=False"
    assert arrays[f"{key}/U"].shape == (2, 2, 3, 4, 5)
    assert arrays[f"{key}/grid"].shape == arrays[f"{key}/dgrid"].shape == (2, 4, 5, 6, 3)
    assert arrays[f"{key}/V"].shape == arrays[f"{key}/dV"].shape == (2, 2, 4, 5, 6)
    assert arrays["3d/affine_grid/align_corners=True/size"].tolist() == [2, 2, 4, 5, 6]
    assert arrays["3d/affine_grid/align_corners=True/theta"].shape == (2, 3, 4)
    identity = "3d/edge/identity/nearest/zeros/align_corners=True"
    np.testing.assert_array_equal(arrays[f"{identity}/V"], arrays[f"{identity}/U"])
    assert "volumes" in manifest["conventions"]


def test_a_golden_file_of_format_version_2_still_checks(golden, tmp_path):
    # A version 2 file is this one without its volume cases: the 2-D cases' inputs did not
    # change (they come first, on the same streams).
    manifest, arrays = load_golden(golden)
    manifest["format_version"] = 2
    manifest["cases"] = [c for c in manifest["cases"] if c.get("dims") != 3]
    keep = {f"{c['key']}/{n}" for c in manifest["cases"] for n in c["inputs"] + c["outputs"]}
    manifest["arrays"] = {k: v for k, v in manifest["arrays"].items() if k in keep}
    path = tmp_path / "v2.npz"
    rewrite_golden(path, {k: a for k, a in arrays.items() if k in keep}, manifest)
    rows = check_against_golden(path)
    assert len(rows) == N_CASES - 26 - 12 and all(r.status == "PASS" for r in rows)
    # A volume case in a version 2 file is not of that format.
    manifest["cases"][0]["dims"] = 3
    rewrite_golden(path, {k: a for k, a in arrays.items() if k in keep}, manifest)
    with pytest.raises(GoldenFormatError, match=r"cases\[0\] .*dims must be 2, or 3"):
        load_golden(path)


@pytest.mark.parametrize("change,message", [
    (lambda m, a: [c.update(mode="bicubic") for c in m["cases"]
                   if c["key"] == "3d/nearest/zeros/align_corners=True"],
     r"3d/nearest/zeros/align_corners=True\): unknown mode.* for a volume"),
    (lambda m, a: [c.pop("dims") for c in m["cases"]
                   if c["key"] == "3d/nearest/zeros/align_corners=True"],
     r"3d/nearest/zeros/align_corners=True/grid: shape \(2, 4, 5, 6, 3\) does not fit"),
    (lambda m, a: a.__setitem__("3d/affine_grid/align_corners=True/size",
                                np.array([2, 2, 4, 5, 7])),
     r"3d/affine_grid/align_corners=True/size: is \[2, 2, 4, 5, 7\], expected "
     r"\[2, C in 1\.\.1048576, 4, 5, 6\]"),
])
def test_load_golden_checks_the_volume_cases(golden, tmp_path, change, message):
    with pytest.raises(GoldenFormatError, match=message):
        load_golden(_tweak(golden, tmp_path, change))


# --- Malformed files exit 2, the golden pair is written whole or not at all ----------


def _main_exit(args, capsys):
    from stn_numpy.verify import main

    code = main(args)
    return code, capsys.readouterr()


def test_a_flipped_data_byte_is_a_malformed_file(golden, tmp_path, capsys):
    data = bytearray(golden.read_bytes())
    with zipfile.ZipFile(golden) as z:
        info = z.getinfo("bilinear/zeros/align_corners=True/U.npy")
    data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF  # inside the data
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(data))
    code, captured = _main_exit(["verify", "--check", str(bad)], capsys)
    assert code == 2 and "Traceback" not in captured.err and captured.err.count("\n") == 1
    assert "CRC" in captured.err


@pytest.mark.parametrize("change, message", [
    (lambda m, a: m.update(cases=[{"key": [[[[]]]]}] + m["cases"]), "cases[0]"),
    (lambda m, a: a["affine_grid/align_corners=True/size"].__setitem__(1, 0), "C in 1.."),
    (lambda m, a: [c.update(lattice=[200, 200]) for c in m["cases"]
                   if c["kind"] == "tps_grid"], "at most 1024 points"),
])
def test_crafted_manifests_exit_2_in_one_line(golden, tmp_path, capsys, change, message):
    manifest, arrays = load_golden(golden)
    change(manifest, arrays)
    path = tmp_path / "crafted.npz"
    rewrite_golden(path, arrays, manifest)
    code, captured = _main_exit(["verify", "--check", str(path)], capsys)
    assert code == 2 and captured.err.count("\n") == 1 and message in captured.err


def test_a_deeply_nested_manifest_is_malformed(tmp_path, capsys):
    path = tmp_path / "deep.npz"
    text = "[" * 100000 + "]" * 100000
    np.savez(path, manifest=np.frombuffer(text.encode(), np.uint8))
    code, captured = _main_exit(["verify", "--check", str(path)], capsys)
    assert code == 2 and "manifest is not UTF-8 JSON" in captured.err


def test_export_checks_both_destinations_then_writes_both(tmp_path, capsys, monkeypatch):
    from stn_numpy import _io

    code, captured = _main_exit(["verify", "--export", str(tmp_path / "g.json")], capsys)
    assert code == 2 and "cannot go to a .json file" in captured.err
    assert os.listdir(tmp_path) == []
    for bad in (".", "", str(tmp_path)):
        code, captured = _main_exit(["verify", "--export", bad], capsys)
        assert code == 2 and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert _main_exit(["verify", "--check", ""], capsys)[0] == 2
    path = export_golden(tmp_path / "g.npz")
    before = path.read_bytes(), (tmp_path / "g.json").read_bytes()
    real_fdopen = os.fdopen

    def failing_json(fd, mode):  # the .json half fails (a full disk, say)
        f = real_fdopen(fd, mode)
        if ".g.json." in os.readlink(f"/proc/self/fd/{fd}"):
            f.close()
            raise OSError(28, "No space left on device")
        return f

    if os.path.exists("/proc/self/fd"):
        monkeypatch.setattr(_io.os, "fdopen", failing_json)
        with pytest.raises(OSError, match="No space"):
            export_golden(path, seed=3)
        monkeypatch.undo()
        assert (path.read_bytes(), (tmp_path / "g.json").read_bytes()) == before
    # A killed export's temporaries are removed by the next one.
    stray = tmp_path / ".g.npz.0123456789abcdef.tmp"
    stray.write_bytes(b"partial")
    export_golden(path)
    assert sorted(os.listdir(tmp_path)) == ["g.json", "g.npz"]


def test_devices_and_fifos_are_refused_and_never_replaced(tmp_path, capsys):
    if os.path.exists("/dev/null"):
        code, captured = _main_exit(["verify", "--export", "/dev/null"], capsys)
        assert code == 2 and "character device" in captured.err
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    if os.path.exists("/dev/zero"):
        code, captured = _main_exit(["verify", "--check", "/dev/zero"], capsys)
        assert code == 2 and "not a regular file" in captured.err
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "pipe.npz"
        os.mkfifo(fifo)
        code, captured = _main_exit(["verify", "--check", str(fifo)], capsys)  # no blocking
        assert code == 2 and "a FIFO" in captured.err
        code, captured = _main_exit(["verify", "--export", str(fifo)], capsys)
        assert code == 2 and stat.S_ISFIFO(os.stat(fifo).st_mode)
