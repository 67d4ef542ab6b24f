"""What the parity matrix and the adapters share: the N/A signal and the coordinate conversion.

:mod:`~stn_numpy.verify.parity` and :mod:`~stn_numpy.verify.adapters` both import them
from here: the adapters need nothing of the parity matrix, so the parity matrix imports
the adapters at the top of its module and the two no longer import each other. Both names
stay importable from :mod:`~stn_numpy.verify.parity` and :mod:`stn_numpy.verify`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Unsupported", "pixel_coordinates"]


class Unsupported(ValueError):
    """Raised by an adapter for a combination its library cannot express (a row marked N/A)."""


def pixel_coordinates(coord, size: int, align_corners: bool):
    """Normalized -> pixel coordinate, rounded as this package's sampler rounds it.

    ``x = (x_s + 1) * (W - 1) / 2`` (align_corners=True) or ``(x_s + 1) * W / 2 - 1/2``
    (False), computed in ``coord``'s dtype; pixel ``k`` has its centre at ``x = k``. Every
    adapter converts with this, so a difference it shows is the library's, not the
    conversion's. Returns ``(x, dx/dx_s)``.
    """
    coord = np.asarray(coord)
    t = coord.dtype.type
    if align_corners:
        scale = (size - 1) / 2
        return (coord + t(1)) * t(scale), scale
    scale = size / 2
    return (coord + t(1)) * t(scale) - t(0.5), scale
