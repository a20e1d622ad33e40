"""Bar charts of the result tables of scripts/parse_results.py, from the rows it has computed.

A table row has a label, values {column: statistic} and, for base-to-new, the published numbers
{method: (base, new, hm)} of the same dataset; a statistic is an object with .mean and .spread
(mean and spread over seeds), a plain number (an HM, an average) or None (not measured).
Base-to-new charts show base, new and HM per dataset and the average, ours (mean +- spread
over seeds) beside the published methods (only for the tables whose report is beside_published, the
accuracy of OpenAI ViT-B/16 runs); the other protocols show their one column. The values are of the
metric the report names (report.metric, a key of the runs' records; the evaluator's metrics are
percentages).
"""

import re
from pathlib import Path

import numpy as np

from trainers.runs.results import DEFAULT_METRIC, OPENAI_DEFAULT_BACKBONE

from .style import OKABE_ITO, new_figure, save, styled

OURS_COLOUR = OKABE_ITO["vermillion"]
PUBLISHED_COLOURS = (OKABE_ITO["blue"], OKABE_ITO["orange"], OKABE_ITO["green"], OKABE_ITO["sky"],
                     OKABE_ITO["purple"], OKABE_ITO["yellow"])
# Methods published only as an 11-dataset average (e.g. RAda's own rows): greys, plain then hatched.
AVERAGE_ONLY_STYLES = tuple((grey, hatch) for hatch in (None, "//", "..") for grey in ("#404040", "#8c8c8c", "#cccccc"))
BASE2NEW_COLUMNS = (("base", "base {} (%)"), ("new", "new {} (%)"), ("hm", "harmonic mean (%)"))
AVERAGE_PREFIX = "Average"
COMPLETE_AVERAGE_PREFIX = "Average ("  # "Average (11 datasets)"; a partial one reads "Average of the datasets present (...)"


def _mean_and_error(value):
    if value is None:
        return None, None
    if hasattr(value, "mean"):
        return float(value.mean), float(value.spread) if getattr(value, "n", 1) > 1 else None
    return float(value), None


def _short_label(label):
    return label.split(" (")[0] if not label.startswith(AVERAGE_PREFIX) else label.replace(" (", "\n(")


def _bars(axes, labels, series, ylabel):
    """Grouped bars: series is [(name, colour, hatch, {x index: (value, error)})]; each x gets one
    slot per series present there, centred. Returns what was drawn: [(name, label, value, error)]."""
    drawn = []
    most = max([sum(1 for *_, values in series if x in values) for x in range(len(labels))] + [1])
    width = min(0.8 / most, 0.35)
    handles = {}
    for x in range(len(labels)):
        present = [(name, colour, hatch, values[x]) for name, colour, hatch, values in series if x in values]
        for slot, (name, colour, hatch, (value, error)) in enumerate(present):
            position = x + (slot - (len(present) - 1) / 2) * width
            bar = axes.bar(position, value, width=width, color=colour, hatch=hatch, edgecolor="0.2" if hatch else "white",
                           linewidth=0.5, yerr=error, capsize=2 if error else 0,
                           error_kw={"elinewidth": 1, "ecolor": OKABE_ITO["black"]})
            handles.setdefault(name, bar)
            drawn.append((name, labels[x], float(bar.patches[0].get_height()), error))
    axes.set_xticks(range(len(labels)), [_short_label(label) for label in labels], rotation=30, ha="right")
    axes.set_ylabel(ylabel)
    axes.grid(axis="y", color="0.9", linewidth=0.8)
    axes.set_axisbelow(True)
    axes.set_xlim(-0.6, len(labels) - 0.4)
    return drawn, handles


def _set_value_range(axes_list, drawn):
    """One y-range for all panels, from 10 below the lowest bar (error bars included) to above the highest."""
    if not drawn:
        return
    lowest = min(value - (error or 0) for *_, value, error in drawn)
    highest = max(value + (error or 0) for *_, value, error in drawn)
    top = min(100.0, highest + 3) if highest <= 100 else highest * 1.05
    for axes in axes_list:
        axes.set_ylim(max(0.0, 10 * np.floor((lowest - 5) / 10)), top)


def _metric_label(metric):
    return metric.replace("_", " ")


def base2new_chart(rows, published, title, path, ours="ours", metric=DEFAULT_METRIC):
    """Base, new and HM panels. published: {(dataset, method): numbers with .base .new .hm}, whose
    'average' rows add the methods published only as an average (shown at the complete average)."""
    labels = [row.label for row in rows]
    per_dataset = list(dict.fromkeys(m for row in rows for m in row.published))
    average_only = [m for (d, m) in published if d == "average" and m not in per_dataset]
    drawn = []
    with styled():
        figure = new_figure(max(7, 1.1 * len(labels) + 3), 9)
        panels = figure.subplots(3, 1, sharex=True)
        for axes, (column, ylabel) in zip(panels, BASE2NEW_COLUMNS, strict=True):
            series = [(ours, OURS_COLOUR, None, {x: _mean_and_error(row.values.get(column))
                                                  for x, row in enumerate(rows) if row.values.get(column) is not None})]
            index = {"base": 0, "new": 1, "hm": 2}[column]
            for method, colour in zip(per_dataset, PUBLISHED_COLOURS * 3, strict=False):
                series.append((method, colour, None, {x: (row.published[method][index], None)
                                                      for x, row in enumerate(rows) if method in row.published}))
            complete_average = [x for x, row in enumerate(rows) if row.label.startswith(COMPLETE_AVERAGE_PREFIX)]
            for method, (colour, hatch) in zip(average_only, AVERAGE_ONLY_STYLES * 2, strict=False):
                numbers = published[("average", method)]
                series.append((method, colour, hatch, {x: (getattr(numbers, column), None) for x in complete_average}))
            panel_drawn, handles = _bars(axes, labels, series, ylabel.format(_metric_label(metric)))
            drawn += [(column, *entry) for entry in panel_drawn]
        _set_value_range(panels, drawn)
        panels[0].legend(handles.values(), handles.keys(), ncol=min(5, len(handles)), loc="lower left",
                         bbox_to_anchor=(0, 1.02), frameon=False)
        figure.suptitle(title)
        save(figure, path)
    return drawn


def accuracy_chart(rows, title, path, ours="ours", metric=DEFAULT_METRIC):
    """One bar of the metric per row (datasets, targets and their averages), mean +- spread over seeds."""
    labels = [row.label for row in rows]
    with styled():
        figure = new_figure(max(8, 0.9 * len(labels) + 3), 5)
        axes = figure.subplots()
        series = [(ours, OURS_COLOUR, None, {x: _mean_and_error(row.values.get("acc"))
                                              for x, row in enumerate(rows) if row.values.get("acc") is not None})]
        panel_drawn, _ = _bars(axes, labels, series, f"{_metric_label(metric)} (%)")
        _set_value_range([axes], panel_drawn)
        for (_, _, value, _), x in zip(panel_drawn, sorted(series[0][3]), strict=True):
            axes.annotate(f"{value:.1f}", (x, value), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=9)
        figure.suptitle(title)
        save(figure, path)
    return [("acc", *entry) for entry in panel_drawn]


def chart_path(path, key, several, backbone=None, metric=DEFAULT_METRIC):
    """FILE for a single table; FILE with the table's protocol, trainer, config and shots otherwise,
    the backbone where given (the tables of backbones other than ViT-B/16) and a metric other than
    the accuracy."""
    path = Path(path)
    if not several:
        return path
    protocol, trainer, cfg, shots = key
    backbone = "_" + re.sub(r"[^\w.-]+", "-", backbone).strip("-") if backbone else ""
    metric = "" if metric == DEFAULT_METRIC else f"_{metric}"
    return path.with_name(f"{path.stem}_{protocol}_{trainer}_{cfg}_shots{shots}{backbone}{metric}"
                          f"{path.suffix or '.png'}")


def plot_results(path, summaries, published, ci95=False):
    """One chart per table with a finished run. summaries: [((protocol, trainer, cfg, shots), report)]
    with report.rows, report.finished, report.backbone, report.metric and report.beside_published, as
    parse_results computes them; the published numbers are drawn only beside_published. Returns
    {written path: [(column, method, row label, value, error)]}, what each chart shows."""
    tables = [(key, report) for key, report in summaries if report.finished]
    written = {}
    for key, report in tables:
        protocol, trainer, cfg, shots = key
        backbone = None if report.backbone == OPENAI_DEFAULT_BACKBONE else report.backbone
        target = chart_path(path, key, len(tables) > 1, backbone, report.metric)
        target.parent.mkdir(parents=True, exist_ok=True)
        spread = "error bars: 95% CI over seeds" if ci95 else "error bars: std over seeds"
        title = f"{protocol} | {trainer} | {cfg} | shots {shots}" + (f" | {backbone}" if backbone else "")
        title += f" | {report.metric}" if report.metric != DEFAULT_METRIC else ""
        title += f"\n({spread})"
        if protocol == "base2new":
            shown = published if report.beside_published else {}
            written[str(target)] = base2new_chart(report.rows, shown, title, target, ours=trainer, metric=report.metric)
        else:
            written[str(target)] = accuracy_chart(report.rows, title, target, ours=trainer, metric=report.metric)
    return written
