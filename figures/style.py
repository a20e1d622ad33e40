"""One look for every figure: readable sizes, the Okabe-Ito colour-blind-safe palette, PNG output
through matplotlib's Agg canvas (a bare Figure, not pyplot: no display, no global figure state)."""

import contextlib

import matplotlib
from cycler import cycler
from matplotlib.figure import Figure

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision deficiencies.
OKABE_ITO = {
    "blue": "#0072B2", "orange": "#E69F00", "green": "#009E73", "vermillion": "#D55E00",
    "sky": "#56B4E9", "purple": "#CC79A7", "yellow": "#F0E442", "black": "#000000",
}
PALETTE = tuple(OKABE_ITO.values())
# Diverging maps of ColorBrewer that stay readable for colour-blind readers.
DIVERGING = "RdBu_r"
MASK_MAP = "PuOr_r"
DPI = 100

STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 9,
    "figure.titlesize": 13,
    "axes.prop_cycle": cycler(color=PALETTE),
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.dpi": DPI,
}


@contextlib.contextmanager
def styled():
    with matplotlib.rc_context(STYLE):
        yield


def new_figure(width, height):
    """A figure of width x height inches; saved at DPI it is (width * DPI) x (height * DPI) pixels."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save(figure, path):
    """Write the figure as a PNG of exactly its size (no tight bounding box, so tests can check it)."""
    figure.savefig(path, dpi=DPI, format="png")
    return str(path)
