"""Figures for the applications (``ftk finetune``'s loss curve, ``ftk bench``'s charts).

matplotlib is optional: nothing imports it until a figure is drawn, through :func:`pyplot`,
which selects the Agg backend (files only: no display, no GUI toolkit, safe on a headless
machine or in a subprocess) and, where matplotlib is missing, raises :class:`PlotsUnavailable`
(an ImportError) whose message names the package and the pip command. The callers catch it,
print that one line and carry on without the figure.
"""

from __future__ import annotations

MISSING = "matplotlib is not installed (pip install matplotlib)"


class PlotsUnavailable(ImportError):
    """matplotlib cannot be imported; str() is :data:`MISSING` when it is not installed."""


def pyplot():
    """matplotlib.pyplot on the Agg backend; PlotsUnavailable when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise PlotsUnavailable(MISSING) from e
    try:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # installed but broken (a missing dependency of its own)
        raise PlotsUnavailable(f"matplotlib cannot be imported: {e} (pip install --upgrade matplotlib)") from e
    return plt
