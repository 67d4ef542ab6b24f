"""ONNX's own node tests of GridSample and AffineGrid, run through stn_numpy.

Recent onnx wheels ship no ``.pb`` test data; the cases are generated from the installed
package (``onnx.backend.test.case.node``: its ``gridsample`` and ``affinegrid`` modules
build each case's node, inputs and expected outputs when imported). Each case's node
attributes, with the operator schema's defaults for the ones it leaves out, become
:func:`stn_numpy.grid_sample` or :func:`stn_numpy.affine_grid` arguments, and our output
must match the expected one within the case's own tolerance (ONNX's runner uses
``rtol=1e-3, atol=1e-7``: the expected values are written with four decimals).

All 16 two-dimensional cases pass (14 GridSample, 2 AffineGrid), and so do the volumetric
(5-D) ones. The ``*_expanded`` AffineGrid cases are the same inputs and outputs run through
the operator's function body (several primitive nodes), so they are not separate cases
here.
"""

import importlib

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason='onnx not installed: pip install -e ".[onnx]"')

from stn_numpy import affine_grid, grid_sample  # noqa: E402
from stn_numpy.onnx import GRID_SAMPLE_MODES  # noqa: E402

OPS = ("GridSample", "AffineGrid")
#: GridSample's mode attribute (opset 16 or 20 names) -> this package's mode
OUR_MODES = {name: ours for names in GRID_SAMPLE_MODES.values() for ours, name in names.items()}


def _cases():
    from onnx.backend.test.case import node

    for module in ("gridsample", "affinegrid"):
        importlib.import_module(f"onnx.backend.test.case.node.{module}")
    return [case for case in node._NodeTestCases
            if len(case.model.graph.node) == 1 and case.model.graph.node[0].op_type in OPS]


CASES = _cases()


def attributes(case) -> dict:
    """The case's node attributes, the schema's defaults (at the case's opset) filled in."""
    node = case.model.graph.node[0]
    opset = case.model.opset_import[0].version
    schema = onnx.defs.get_schema(node.op_type, opset)
    values = {name: onnx.helper.get_attribute_value(a.default_value)
              for name, a in schema.attributes.items() if a.default_value.name}
    values.update({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def run_with_stn_numpy(case):
    """Our output for the case's inputs (images or volumes)."""
    op = case.model.graph.node[0].op_type
    attrs = attributes(case)
    inputs = case.data_sets[0][0]
    if op == "GridSample":
        X, grid = inputs
        return grid_sample(X, grid, OUR_MODES[attrs["mode"]], attrs["padding_mode"],
                           bool(attrs["align_corners"]))
    theta, size = inputs
    return affine_grid(theta, size, bool(attrs["align_corners"]))


def test_the_cases_are_there():
    # A silently empty list would make every test below vacuous.
    names = {case.name for case in CASES}
    two_d = [case for case in CASES if "volumetric" not in case.name and "3d" not in case.name]
    assert len(two_d) >= 16 and {"test_gridsample_bicubic", "test_affine_grid_2d"} <= names


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_onnx_node_case(case):
    ours = run_with_stn_numpy(case)
    (expected,) = case.data_sets[0][1]
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=case.rtol, atol=case.atol,
                               err_msg=f"{case.name}: {attributes(case)}")
