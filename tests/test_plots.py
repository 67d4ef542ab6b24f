"""Tests for stn_numpy.plots: figures are written atomically, and measure panels read true."""

import pytest
from matplotlib.figure import Figure

from stn_numpy.plots import Curve, _plot_measure, plot_curves

HISTORY = [{"epoch": 1, "train_loss": 1.0, "test_loss": 1.1, "train_acc": 0.5, "test_acc": 0.4},
           {"epoch": 2, "train_loss": 0.5, "test_loss": 0.6, "train_acc": 0.8, "test_acc": 0.7}]


def test_failed_figure_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "curves.png"
    plot_curves(HISTORY, path)
    before = path.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"

    def killed_mid_write(self, f, **kwargs):
        f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        plot_curves(HISTORY[:1], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


@pytest.mark.parametrize("values, span", [([0.99994, 1.0, 0.99997], 0.1), ([-0.1, -0.5], 0.4)])
def test_measure_panel_spans_at_least_a_tenth_without_an_offset(values, span):
    # A measure within 1e-4 of 1 filled the panel under an offset label ("1e-5 +
    # 9.999e-1") and read as large drops; a wide one keeps its own range.
    ax = Figure().subplots()
    _plot_measure(ax, [Curve("run", 0, 0, list(range(len(values))), values, values)],
                  "measure", ((1.0, "ideal"),))
    ax.figure.canvas.draw()
    low, high = ax.get_ylim()
    assert high - low >= span
    assert low <= min(values) and max(values) <= high
    assert ax.yaxis.get_offset_text().get_text() == ""
