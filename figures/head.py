"""What the RAda head learned: the distribution of its mask values and the rational matrix of
single images.

For an image feature f and class text features t_k (L2-normalised, as the head receives them),
the rational matrix is R[k, d] = f_d * t_kd; the head predicts a mask M >= 0 of the same shape
and scores class k by s * sum_d M[k, d] R[k, d]. M = 1 everywhere is plain CLIP; an entry of 0
is a dimension the head switched off (relu(1 + m) clipped it).
"""

import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm

from .style import DIVERGING, MASK_MAP, OKABE_ITO, new_figure, save, styled

# Mask values fall into bins [i / BINS_PER_UNIT, (i + 1) / BINS_PER_UNIT); 1.0 * 50 is exact, so
# the identity mask lands in one bin, the one starting at 1.
BINS_PER_UNIT = 50
GROUPS = ("all", "true_class", "other_classes")
GROUP_TITLES = {"all": "all entries", "true_class": "true class", "other_classes": "other classes"}
# The histogram's x-axis ends where this share of all entries lies to its left.
SHOWN_QUANTILE = 0.999
MAX_DISPLAY_BINS = 120


class ValueHistogram:
    """Counts of non-negative values in fixed bins, accumulated batch by batch (a whole test set
    of B x K x D entries never has to be held at once), with the exact count of zeros and the
    sum of |M - 1|."""

    def __init__(self):
        self.counts = np.zeros(0, dtype=np.int64)
        self.entries = 0
        self.zeros = 0
        self.ones = 0
        self.abs_deviation_sum = 0.0
        self.minimum = float("inf")
        self.maximum = float("-inf")

    def add(self, values):
        values = values.detach().flatten().to(torch.float64)
        if values.numel() == 0:
            return
        if bool((values < 0).any()) or not bool(torch.isfinite(values).all()):
            raise ValueError("mask values must be finite and >= 0")
        bins = torch.floor(values * BINS_PER_UNIT).to(torch.int64)
        batch_counts = torch.bincount(bins).cpu().numpy()
        if batch_counts.size > self.counts.size:
            self.counts = np.pad(self.counts, (0, batch_counts.size - self.counts.size))
        self.counts[: batch_counts.size] += batch_counts
        self.entries += values.numel()
        self.zeros += int((values == 0).sum())
        self.ones += int((values == 1).sum())
        self.abs_deviation_sum += float((values - 1).abs().sum())
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))

    def summary(self):
        entries = max(self.entries, 1)
        return {
            "entries": self.entries,
            "bin_width": 1 / BINS_PER_UNIT,
            "bin_edges_start": 0.0,
            "counts": self.counts.tolist(),
            "clipped_share": self.zeros / entries,
            "share_exactly_one": self.ones / entries,
            "mean_abs_deviation": self.abs_deviation_sum / entries,
            "min": self.minimum if self.entries else None,
            "max": self.maximum if self.entries else None,
        }


class MaskStatistics:
    """Mask histograms over a test set: all entries, the rows of each image's true class, the
    rows of the other classes; and how often the head and CLIP alone (M = 1) are right."""

    def __init__(self):
        self.histograms = {group: ValueHistogram() for group in GROUPS}
        self.images = 0
        self.correct = {"rada": 0, "zero_shot": 0}
        self.shape = None

    def add(self, mask, labels, logits, zero_shot_logits):
        """mask (B, K, D), labels (B,), the head's logits and those of the same features with M = 1 (B, K)."""
        batch, classes, dim = mask.shape
        self.shape = (classes, dim)
        labels = labels.to(mask.device)
        is_true = torch.zeros(batch, classes, dtype=torch.bool, device=mask.device)
        is_true[torch.arange(batch, device=mask.device), labels] = True
        self.histograms["all"].add(mask)
        self.histograms["true_class"].add(mask[is_true])
        self.histograms["other_classes"].add(mask[~is_true])
        self.images += batch
        self.correct["rada"] += int((logits.argmax(dim=1).to(labels.device) == labels).sum())
        self.correct["zero_shot"] += int((zero_shot_logits.argmax(dim=1).to(labels.device) == labels).sum())

    def summary(self):
        classes, dim = self.shape or (0, 0)
        images = max(self.images, 1)
        return {
            "images": self.images,
            "classes": classes,
            "dim": dim,
            "accuracy": {name: 100.0 * count / images for name, count in self.correct.items()},
            **{group: histogram.summary() for group, histogram in self.histograms.items()},
        }


def _shown_range(counts, quantile=SHOWN_QUANTILE):
    """The upper end of the x-axis: past the quantile of the values and past 1 (the identity)."""
    total = counts.sum()
    last_bin = int(np.searchsorted(np.cumsum(counts), quantile * total)) if total else 0
    return max((last_bin + 1) / BINS_PER_UNIT, 1.0 + 5 / BINS_PER_UNIT)


def display_histogram(stats, upper):
    """(bin width, share % per displayed bin, share % clipped) of a group: the fine bins merged so
    that at most MAX_DISPLAY_BINS cover [0, upper), the exact zeros taken out of the first bin
    (they get their own bar at M = 0)."""
    counts = np.asarray(stats["counts"], dtype=np.float64)
    fine_bins = int(np.ceil(upper * BINS_PER_UNIT))
    factor = max(1, int(np.ceil(fine_bins / MAX_DISPLAY_BINS)))
    shown = np.zeros(int(np.ceil(fine_bins / factor)) * factor)
    kept = counts[: shown.size]
    shown[: kept.size] = kept
    entries = max(stats["entries"], 1)
    zeros = stats["clipped_share"] * entries
    if shown.size:
        shown[0] -= zeros
    return factor / BINS_PER_UNIT, shown.reshape(-1, factor).sum(axis=1) / entries * 100, zeros / entries * 100


def plot_mask_histogram(summary, path, title=""):
    """Two panels: every mask entry, then the true class's rows against the other classes' rows;
    each bar is the share of its group's entries in one bin, the entries clipped to exactly 0
    a bar of their own left of 0. Returns the PNG path."""
    upper = _shown_range(np.asarray(summary["all"]["counts"], dtype=np.float64))
    with styled():
        figure = new_figure(11, 4.2)
        axes_all, axes_groups = figure.subplots(1, 2)
        width, shares, clipped = display_histogram(summary["all"], upper)
        axes_all.bar(np.arange(shares.size) * width, shares, width=width, align="edge", color=OKABE_ITO["blue"],
                     linewidth=0)
        axes_all.bar(-width, clipped, width=width, align="edge", color=OKABE_ITO["vermillion"], linewidth=0)
        stats = summary["all"]
        axes_all.set_title(f"All entries ({summary['images']} images x {summary['classes']} classes x {summary['dim']} dims)")
        axes_all.text(0.03, 0.95, f"clipped at 0 (left bar): {stats['clipped_share']:.2%}\n"
                      f"mean |M - 1|: {stats['mean_abs_deviation']:.3g}",
                      transform=axes_all.transAxes, ha="left", va="top",
                      bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.8"})

        for group, colour in (("other_classes", OKABE_ITO["blue"]), ("true_class", OKABE_ITO["vermillion"])):
            width, shares, clipped = display_histogram(summary[group], upper)
            group_stats = summary[group]
            label = (f"{GROUP_TITLES[group]}: clipped {group_stats['clipped_share']:.2%}, "
                     f"mean |M - 1| {group_stats['mean_abs_deviation']:.3g}")
            edges = np.arange(-1, shares.size + 1) * width
            axes_groups.stairs(np.concatenate([[clipped], shares]), edges, color=colour, linewidth=1.8, label=label,
                               fill=group == "other_classes", alpha=0.35 if group == "other_classes" else 1.0)
        axes_groups.set_title("True class vs other classes")
        axes_groups.legend(loc="upper left", frameon=False)

        for axes in (axes_all, axes_groups):
            axes.axvline(1.0, color=OKABE_ITO["black"], linestyle="--", linewidth=1)
            axes.axvline(0.0, color="0.6", linewidth=0.8)
            axes.set_xlim(-width, upper)
            axes.set_xlabel("mask value M (1 = CLIP unchanged, 0 = dimension switched off)")
            axes.set_ylabel(f"share of entries per bin of {width:.2g} (%)")
        if title:
            figure.suptitle(title)
        return save(figure, path)


def dimension_order(rational_row):
    """Dimensions by decreasing contribution to the true class's score, so the sorted row falls
    smoothly and the other rows and the mask show how they differ from it."""
    return np.argsort(-np.asarray(rational_row), kind="stable")


def plot_rational_matrix(image, rational, mask, class_names, path, title="", clip_logits=None, rada_logits=None):
    """The image beside R and M * R (and M) for a few classes, the first row the true class.

    image: (H, W, 3) floats in [0, 1]; rational, mask: (k, D); class_names: k names;
    clip_logits, rada_logits: the k scores without and with the mask, shown beside the rows.
    Returns (PNG path, the dimension order used).
    """
    rational, mask = np.asarray(rational, dtype=np.float64), np.asarray(mask, dtype=np.float64)
    order = dimension_order(rational[0])
    rational, mask = rational[:, order], mask[:, order]
    masked = mask * rational
    limit = max(float(np.abs(rational).max()), float(np.abs(masked).max()), 1e-12)
    # M's colours span its own range around 1, so that small deviations of a young head show too.
    mask_spread = max(float(np.abs(mask - 1).max()), 1e-3)
    mask_norm = TwoSlopeNorm(vmin=min(float(mask.min()), 1 - mask_spread), vcenter=1.0,
                             vmax=max(float(mask.max()), 1 + mask_spread))
    rows = [f"{name} (true)" if i == 0 else name for i, name in enumerate(class_names)]
    with styled():
        figure = new_figure(13, 6.5)
        grid = figure.add_gridspec(3, 2, width_ratios=(1, 3.6))
        axes_image = figure.add_subplot(grid[:, 0])
        axes_image.imshow(np.clip(image, 0, 1))
        axes_image.set_axis_off()
        panels = (
            ("R = f * t_k (CLIP's rational matrix)", rational, DIVERGING, {"vmin": -limit, "vmax": limit},
             clip_logits, "logit, M = 1"),
            ("M (the head's mask)", mask, MASK_MAP, {"norm": mask_norm}, None, ""),
            ("M * R (what the head keeps)", masked, DIVERGING, {"vmin": -limit, "vmax": limit}, rada_logits, "RAda logit"),
        )
        for row, (name, values, colour_map, scale, scores, score_label) in enumerate(panels):
            axes = figure.add_subplot(grid[row, 1])
            shown = axes.imshow(values, aspect="auto", interpolation="nearest", cmap=colour_map, **scale)
            axes.set_title(name, loc="left")
            axes.set_yticks(range(len(rows)), rows)
            if scores is not None:
                side = axes.secondary_yaxis("right")
                side.set_yticks(range(len(rows)), [f"{score:.2f}" for score in scores])
                side.set_ylabel(score_label, rotation=270, labelpad=14)
            axes.set_xticks([])
            figure.colorbar(shown, ax=axes, pad=0.08 if scores is not None else 0.02, fraction=0.04)
        axes.set_xlabel(f"feature dimension ({values.shape[1]}), sorted by the true class's R")
        if title:
            figure.suptitle(title)
        return save(figure, path), order
