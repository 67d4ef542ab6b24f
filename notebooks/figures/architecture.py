"""Draw the spatial transformer's architecture (Jaderberg et al. 2015, Fig. 2) as architecture.png.

Usage, from the repository root::

    python notebooks/figures/architecture.py

The figure is written beside this script, where the README and notebook 01 show it. It shows
the forward data flow (black) and, dashed, the gradients: dL/dV enters the sampler, which
sends dL/dgrid to the grid generator and dL/dtheta on to the localisation net; dL/dU is the
sum of two paths, the sampler's (U read with the grid fixed) and the localisation net's (U
decides theta).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from stn_numpy._io import atomic_write  # noqa: E402

OUT = Path(__file__).resolve().parent / "architecture.png"


def box(ax, x, y, w, h, title, lines, color):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=color, ec="0.25", lw=1.2))
    ax.text(x + w / 2, y + h - 0.16, title, ha="center", va="top", fontsize=10, weight="bold")
    ax.text(x + w / 2, y + h / 2 - 0.12, "\n".join(lines), ha="center", va="center", fontsize=8)


def arrow(ax, start, end, label=None, dashed=False, color="k", rad=0.0, offset=(0, 0.1)):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, lw=1.3,
                                 color=color, ls="--" if dashed else "-",
                                 connectionstyle=f"arc3,rad={rad}"))
    if label:
        mx, my = (start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1]
        ax.text(mx, my, label, ha="center", va="bottom", fontsize=8, color=color)


def draw(path: Path = OUT) -> Path:
    fig, ax = plt.subplots(figsize=(9.5, 3.4))
    ax.set(xlim=(0, 10.5), ylim=(-0.3, 4.2))
    ax.axis("off")
    # The spatial transformer module, as in the paper's figure.
    ax.add_patch(FancyBboxPatch((1.55, 0.15), 6.85, 3.95, boxstyle="round,pad=0.02",
                                fc="none", ec="0.55", ls=":", lw=1.2))
    ax.text(4.95, 4.0, "spatial transformer", ha="center", va="top", fontsize=9, color="0.4")

    ax.text(0.55, 1.0, "U", ha="center", va="center", fontsize=16, weight="bold")
    ax.text(0.55, 0.55, "(N, C, H, W)", ha="center", fontsize=7)
    box(ax, 1.9, 2.2, 2.2, 1.4, "localisation net", [r"$\theta = f_{loc}(U)$",
                                                     "conv, pool, fc, ...", "head: zero W,",
                                                     "identity bias"], "#dbe9f6")
    box(ax, 4.6, 2.2, 2.2, 1.4, "grid generator", [r"$(x_s, y_s) = \mathcal{T}_\theta(G)$",
                                                   "affine_grid,", "tps_grid, ..."], "#e5f2df")
    box(ax, 4.6, 0.35, 2.2, 1.3, "sampler", [r"$V_i = \sum_{n,m} U_{nm}\,k(x_i - m)\,k(y_i - n)$",
                                             "grid_sample"], "#fbe5d6")
    ax.text(9.35, 1.0, "V", ha="center", va="center", fontsize=16, weight="bold")
    ax.text(9.35, 0.55, "(N, C, H', W')", ha="center", fontsize=7)

    arrow(ax, (0.85, 1.15), (1.9, 2.7), "U")
    arrow(ax, (0.9, 1.0), (4.6, 1.0), "U")
    arrow(ax, (4.1, 2.9), (4.6, 2.9), r"$\theta$")
    arrow(ax, (5.7, 2.2), (5.7, 1.65), "grid", offset=(0.3, -0.1))
    arrow(ax, (6.8, 1.0), (9.0, 1.0), "V")
    # Gradients: dL/dV enters the sampler, which sends dU one way and dgrid the other.
    grad = "C3"
    arrow(ax, (9.0, 0.7), (6.8, 0.7), r"$\partial L/\partial V$", dashed=True, color=grad,
          offset=(0, -0.32))
    arrow(ax, (6.25, 1.65), (6.25, 2.2), r"$\partial L/\partial$grid", dashed=True, color=grad,
          offset=(0.75, -0.1))
    arrow(ax, (4.6, 3.3), (4.1, 3.3), r"$\partial L/\partial\theta$", dashed=True, color=grad)
    arrow(ax, (4.6, 0.7), (0.9, 0.7), r"$\partial L/\partial U$, sampler path",
          dashed=True, color=grad, offset=(0, -0.32))
    arrow(ax, (1.9, 2.35), (0.7, 1.3), None, dashed=True, color=grad)
    ax.text(0.62, 1.95, "localisation\npath", ha="right", va="center", fontsize=8, color=grad)
    ax.text(0.1, -0.15, r"$\partial L/\partial U$ = the sum of both paths", ha="left",
            fontsize=8, color=grad)
    fig.tight_layout()
    # Atomic, as every file this project writes: a kill mid-write keeps the old figure.
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(f"wrote {draw().name}")
