#!/usr/bin/env python
"""Tables of the protocol runs written by scripts/rada/*.sh, beside the published numbers.

    python scripts/parse_results.py OUTPUT_DIR [--protocol base2new|fewshot|xd|dg|ttt] [--seeds 1 2 3]
                                    [--metric NAME] [--ci95] [--csv PATH] [--plot FILE]

OUTPUT_DIR is the output root of the scripts (default there: ./output) or one protocol folder in it.
Runs are grouped by (protocol, trainer, config, shots, backbone). Per dataset the table shows the mean and the
spread over seeds (population std, np.std, as in CoOp's parse_test_res.py, or the 95% confidence half-width
1.96 * std / sqrt(n) with --ci95): base / new / HM for base-to-new (base from train_base, new from
test_new, HM = 2BN / (B + N) of the seed means), accuracy for few-shot and cross-dataset runs, and
for the full fine-tuning protocol (dg) the ImageNet accuracy, each of the five shifts and their mean.
Test-time training runs (ttt) show the test-time trained accuracy per target, grouped by where they
start: shots_0 from the identity head, shots_K from a model trained on K shots (scripts/rada/ttt.sh).
A run's result is its final test record in results.jsonl, where train.py wrote one, else the result
its logs show (older runs, CoOp / MaPLe logs: the accuracy only). The tables show the accuracy, or the
metric --metric names: any metric of the records read, e.g. macro_f1, or zero_shot_accuracy (test-time
training's model before adaptation); a finished run without it is listed, not counted. The published
numbers are accuracies: shown beside accuracy tables only.
Base-to-new tables of OpenAI ViT-B/16 runs also show the published numbers of
scripts/baselines/base2new_vit_b16.csv; runs of other backbones get tables of their own, without them.
The backbone is the one the run's record or `* result:` line names, else (older logs)
MODEL.BACKBONE.NAME of the run's run.json, else the one of its config file
(configs/trainers/<trainer>/<cfg>.yaml), else ViT-B/16.
Table headings name the backbone when the runs read are not all ViT-B/16.
Missing seeds, unfinished runs and logs that contradict their folder are listed under each table.
The exit status is 1 when no finished run was found.
"""
from __future__ import annotations

import argparse
import csv
import functools
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's packages

from trainers.runs.results import (  # noqa: E402  (the results contract: layout, logs, re-run hints)
    ALL_SHOTS,
    DEFAULT_METRIC,
    OPENAI_DEFAULT_BACKBONE,
    PART,
    PROTOCOLS,
    SEED_FOLDER,
    SHOTS_FOLDER,
    ResultsError,
    RunState,
    backbone_identity,
    parse_log,  # noqa: F401  (part of this script's interface: one log read the same way)
    part_rerun_command,
    parts_of,
    read_run,
    read_run_record,
    shots_text,
)

try:
    from tabulate import tabulate
except ImportError:
    sys.exit(
        "error: parse_results.py needs the tabulate package. Use the project environment: "
        "source scripts/setup_env.sh, then python scripts/parse_results.py ..."
    )

BASELINES_CSV = Path(__file__).resolve().parent / "baselines" / "base2new_vit_b16.csv"
TRAINER_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "trainers"
BASELINES_HEADER = ["dataset", "method", "base", "new", "hm", "source"]

# The 11 datasets of the base-to-new and few-shot benchmarks, in the papers' order.
BENCHMARK = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)
XD_TARGETS = BENCHMARK[1:]
DG_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
# The distribution shifts of the full fine-tuning protocol, in the order of FLYP's ImageNet table.
FFT_TARGETS = ("imagenetv2", "imagenet_r", "imagenet_a", "imagenet_sketch", "objectnet")
# ViT-B/16 fine-tuned on ImageNet: (method, ImageNet, mean of the five shifts, source).
FFT_PUBLISHED = (
    ("RAda-FT", 81.4, 61.3, "RAda paper"),
    ("FLYP", 82.6, 60.2, "FLYP paper; 59.5 shifts in the RAda paper's re-run"),
)
DISPLAY_NAMES = {
    "imagenet": "ImageNet", "caltech101": "Caltech101", "oxford_pets": "OxfordPets",
    "stanford_cars": "StanfordCars", "oxford_flowers": "Flowers102", "food101": "Food101",
    "fgvc_aircraft": "FGVCAircraft", "sun397": "SUN397", "dtd": "DTD", "eurosat": "EuroSAT",
    "ucf101": "UCF101", "imagenetv2": "ImageNetV2", "imagenet_sketch": "ImageNet-Sketch",
    "imagenet_a": "ImageNet-A", "imagenet_r": "ImageNet-R", "objectnet": "ObjectNet",
}

@dataclass
class Run:
    part: str
    dataset: str
    shots: int  # ALL_SHOTS for shots_all
    trainer: str
    cfg: str
    seed: int
    path: Path
    state: RunState | None  # None: the folder has no log.txt and no results.jsonl
    backbone: str = OPENAI_DEFAULT_BACKBONE

    @property
    def protocol(self):
        return PART[self.part].protocol

    @property
    def table(self):
        """The runs of one table: a group on one backbone."""
        return self.group, self.backbone

    @property
    def group(self):
        return (self.protocol, self.trainer, self.cfg, self.shots)

    def mismatch(self):
        """Why the run's own metadata (record or log) contradicts the folder it is in (None when it agrees)."""
        fields = self.state.fields if self.state else {}
        expected = {"seed": str(self.seed), "trainer": self.trainer, "subsample": PART[self.part].subsample}
        wrong = [f"{key}={fields[key]} (folder says {value})" for key, value in expected.items()
                 if key in fields and fields[key] != value]
        return ", ".join(wrong) or None


def discover_runs(root, protocols):
    """All seed folders under root for the given protocols; also the folders whose names do not fit."""
    runs, odd_folders = [], []
    for protocol in protocols:
        for part in parts_of(protocol):
            for seed_dir in sorted((root / part.folder).glob("*/*/*/*/seed*")):
                if not seed_dir.is_dir():
                    continue
                dataset, shots_name, trainer, cfg = seed_dir.parts[-5:-1]
                shots = SHOTS_FOLDER.fullmatch(shots_name)
                seed = SEED_FOLDER.fullmatch(seed_dir.name)
                if not (shots and seed):
                    odd_folders.append(seed_dir)
                    continue
                shots = ALL_SHOTS if shots.group(1) == "all" else int(shots.group(1))
                state = read_run(seed_dir)
                runs.append(Run(part.name, dataset, shots, trainer, cfg, int(seed.group(1)), seed_dir, state,
                                run_backbone(seed_dir, state, trainer, cfg)))
    return runs, odd_folders


def run_backbone(run_dir, state, trainer, cfg):
    """The backbone a run used: its record's or result line's, else its run.json's, else its config file's."""
    if state is not None and "backbone" in state.fields:
        return state.fields["backbone"]
    config = read_run_record(run_dir).get("config", {})
    if config.get("MODEL.BACKBONE.NAME"):
        return backbone_identity(config["MODEL.BACKBONE.NAME"], config.get("MODEL.BACKBONE.WEIGHTS", ""))
    return config_file_backbone(trainer, cfg)


@functools.cache
def config_file_backbone(trainer, cfg):
    """MODEL.BACKBONE.NAME of configs/trainers/<trainer>/<cfg>.yaml; ViT-B/16 where that file names none."""
    import yaml  # a dependency of yacs, only needed for logs older than the backbone field

    path = TRAINER_CONFIGS / trainer / f"{cfg}.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return config["MODEL"]["BACKBONE"]["NAME"] or OPENAI_DEFAULT_BACKBONE
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return OPENAI_DEFAULT_BACKBONE


@dataclass
class Stat:
    mean: float
    spread: float  # std over seeds, or the 95% confidence half-width
    n: int


def summarise(values, ci95=False):
    """Mean and spread of per-seed values of a metric; None for no values."""
    if not values:
        return None
    std = statistics.pstdev(values)
    spread = 1.96 * std / math.sqrt(len(values)) if ci95 else std
    return Stat(statistics.fmean(values), spread, len(values))


def harmonic_mean(base, new):
    return 2 * base * new / (base + new) if base + new else 0.0


class Published(NamedTuple):
    base: float
    new: float
    hm: float
    source: str


def load_published(path=BASELINES_CSV):
    """{(dataset, method): Published} from the published-baselines file; 'average' rows included."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header != BASELINES_HEADER:
                raise ResultsError(f"{path}: the header must be {','.join(BASELINES_HEADER)}, found {header}")
            published = {}
            for line_number, row in enumerate(reader, start=2):
                try:
                    dataset, method, base, new, hm, source = row
                    published[(dataset, method)] = Published(float(base), float(new), float(hm), source)
                except ValueError:
                    raise ResultsError(f"{path}, line {line_number}: expected {len(BASELINES_HEADER)} columns "
                                       f"with numbers for base, new and hm, found {row}") from None
    except OSError as error:
        raise ResultsError(f"cannot read the published baselines {path}: {error.strerror}") from None
    return published


@dataclass
class Row:
    label: str
    values: dict  # column name -> Stat (per dataset) or float (HM, averages) or None
    seeds: str = ""
    published: dict = field(default_factory=dict)  # method -> (base, new, hm)


def _mean_of(stat):
    return stat.mean if isinstance(stat, Stat) else stat


def _average_row(label_all, label_some, wanted, rows_by_dataset, columns):
    """The average over the datasets in `wanted`, using only those with every column measured.

    Complete: labelled label_all. Partial (at least two datasets): labelled with how many are in it,
    because the papers' average is over all of them. None otherwise.
    """
    present = [d for d in wanted if d in rows_by_dataset
               and all(rows_by_dataset[d].values.get(c) is not None for c in columns)]
    if len(present) < 2:
        return None, present
    values = {c: statistics.fmean(_mean_of(rows_by_dataset[d].values[c]) for d in present) for c in columns}
    label = label_all if len(present) == len(wanted) else f"{label_some} ({len(present)} of {len(wanted)})"
    return Row(label, values), present


def base2new_rows(accuracies, published, ci95):
    """accuracies: {(part, dataset): {seed: value of the metric shown}} -> table rows, the average last."""
    methods = _per_dataset_methods(published)
    rows_by_dataset = {}
    for dataset in _ordered({d for _, d in accuracies}):
        base = summarise(list(accuracies.get(("train_base", dataset), {}).values()), ci95)
        new = summarise(list(accuracies.get(("test_new", dataset), {}).values()), ci95)
        hm = harmonic_mean(base.mean, new.mean) if base and new else None
        rows_by_dataset[dataset] = Row(
            DISPLAY_NAMES.get(dataset, dataset),
            {"base": base, "new": new, "hm": hm},
            seeds=f"{base.n if base else 0}/{new.n if new else 0}",
            published={m: published[(dataset, m)][:3] for m in methods if (dataset, m) in published},
        )
    rows = list(rows_by_dataset.values())
    average, present = _average_row("Average (11 datasets)", "Average of the datasets present",
                                     BENCHMARK, rows_by_dataset, ("base", "new"))
    if average:
        # The papers' convention: HM of the averaged base and new accuracies.
        average.values["hm"] = harmonic_mean(average.values["base"], average.values["new"])
        if len(present) == len(BENCHMARK):
            average.published = {m: published[("average", m)][:3] for m in methods if ("average", m) in published}
        else:  # the published columns averaged over the same datasets, for a like-for-like comparison
            for method in methods:
                if all((d, method) in published for d in present):
                    base = statistics.fmean(published[(d, method)].base for d in present)
                    new = statistics.fmean(published[(d, method)].new for d in present)
                    average.published[method] = (base, new, harmonic_mean(base, new))
        rows.append(average)
    return rows


def accuracy_rows(accuracies, protocol, ci95):
    """Few-shot, cross-dataset, full fine-tuning and test-time training tables: one column (the metric
    shown, "acc"); averages as in the papers."""
    rows_by_dataset = {}
    parts = [part.name for part in parts_of(protocol)]
    source_part, test_part = parts if protocol in ("xd", "dg") else (None, parts[0])
    if source_part:
        source = summarise(list(accuracies.get((source_part, "imagenet"), {}).values()), ci95)
        if source:
            role = "source" if protocol == "xd" else "in distribution"
            rows_by_dataset["source"] = Row(f"ImageNet ({role}, from the training run)", {"acc": source}, str(source.n))
    order = FFT_TARGETS if protocol == "dg" else BENCHMARK + DG_TARGETS
    for dataset in _ordered({d for part, d in accuracies if part == test_part}, order):
        stat = summarise(list(accuracies[(test_part, dataset)].values()), ci95)
        rows_by_dataset[dataset] = Row(DISPLAY_NAMES.get(dataset, dataset), {"acc": stat}, str(stat.n if stat else 0))
    rows = list(rows_by_dataset.values())
    if protocol in ("xd", "ttt"):
        averages = [("Cross-dataset average (10 targets)", "Cross-dataset average of the targets present", XD_TARGETS),
                    ("Domain generalisation average (4 targets)", "Domain generalisation average of the targets present", DG_TARGETS)]
    elif protocol == "dg":
        averages = [("Mean of the 5 shifts", "Mean of the shifts present", FFT_TARGETS)]
    else:
        averages = [("Average (11 datasets)", "Average of the datasets present", BENCHMARK)]
    for label_all, label_some, wanted in averages:
        average, _ = _average_row(label_all, label_some, wanted, rows_by_dataset, ("acc",))
        if average:
            rows.append(average)
    return rows


def _ordered(datasets, order=BENCHMARK + DG_TARGETS):
    """The papers' order first (the benchmark's, by default), then any other dataset alphabetically."""
    return sorted(datasets, key=lambda d: (order.index(d) if d in order else len(order), d))


def _per_dataset_methods(published):
    """Methods with per-dataset numbers, in file order: the published columns of the table."""
    return list(dict.fromkeys(method for dataset, method in published if dataset != "average"))


def format_cell(value):
    if value is None:
        return "-"
    if isinstance(value, Stat):
        return f"{value.mean:.2f}" if value.n == 1 else f"{value.mean:.2f} +- {value.spread:.2f}"
    return f"{value:.2f}"


def render_table(protocol, rows, ci95, metric=DEFAULT_METRIC):
    spread = "mean +- 95% CI" if ci95 else "mean +- std"
    if protocol == "base2new":
        methods = list(dict.fromkeys(m for row in rows for m in row.published))
        headers = ["dataset", "seeds B/N", f"base ({spread})", "new", "HM"] + [f"{m} B / N / HM" for m in methods]
        body = [[row.label, row.seeds, *(format_cell(row.values.get(c)) for c in ("base", "new", "hm")),
                 *(" / ".join(f"{x:.2f}" for x in row.published[m]) if m in row.published else "-" for m in methods)]
                for row in rows]
    else:
        headers = ["dataset", "seeds", f"{metric} ({spread})"]
        body = [[row.label, row.seeds, format_cell(row.values.get("acc"))] for row in rows]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


@dataclass
class GroupReport:
    """One (protocol, trainer, cfg, shots) group on one backbone: its table rows of one metric and what is
    wrong or absent."""

    backbone: str = OPENAI_DEFAULT_BACKBONE
    metric: str = DEFAULT_METRIC
    rows: list = field(default_factory=list)
    finished: int = 0
    missing: list = field(default_factory=list)  # expected seeds without a folder, with the command to run
    unfinished: list = field(default_factory=list)
    rejected: list = field(default_factory=list)  # logs that contradict their folder
    fallback: list = field(default_factory=list)  # read from Dassl's `* accuracy:` line
    without_metric: list = field(default_factory=list)  # finished runs that do not report the metric shown
    ignored_seeds: list = field(default_factory=list)
    not_run: list = field(default_factory=list)  # benchmark datasets with no folder at all

    @property
    def beside_published(self):
        """Whether the published numbers (accuracies of OpenAI ViT-B/16) belong beside this table."""
        return self.backbone == OPENAI_DEFAULT_BACKBONE and self.metric == DEFAULT_METRIC


def summarise_group(key, runs, root, seeds, published, ci95, backbone=OPENAI_DEFAULT_BACKBONE,
                    metric=DEFAULT_METRIC):
    protocol, trainer, cfg, shots = key
    accuracies = defaultdict(dict)  # the values of `metric`
    report = GroupReport(backbone, metric)
    if not report.beside_published:
        published = {}
    present = defaultdict(set)
    for run in runs:
        if run.seed not in seeds:
            report.ignored_seeds.append(run.path)
            continue
        present[(run.part, run.dataset)].add(run.seed)
        if run.state is None:
            report.unfinished.append(f"{run.path}: no log.txt (never started, or stopped before logging)")
        elif not run.state.finished:
            report.unfinished.append(f"{run.path}: {run.state.progress}")
        elif mismatch := run.mismatch():
            report.rejected.append(f"{run.path}: its log reports {mismatch}")
        elif metric not in run.state.metrics:
            report.without_metric.append(f"{run.path}: it reports {', '.join(sorted(run.state.metrics))}")
        else:
            accuracies[(run.part, run.dataset)][run.seed] = run.state.metrics[metric]
            report.finished += 1
            if run.state.from_dassl_line:
                report.fallback.append(run.path)

    # A dataset started in any part is expected in every part, for every seed (xd, dg: one ImageNet training).
    targets = {dataset for part, dataset in present if not PART[part].trains_on_imagenet}
    expected = [(part.name, dataset) for part in parts_of(protocol)
                for dataset in (["imagenet"] if part.trains_on_imagenet else _ordered(targets))]
    for part, dataset in expected:
        for seed in sorted(set(seeds) - present[(part, dataset)]):
            report.missing.append(f"{part} {dataset} seed {seed}: run "
                                  + part_rerun_command(root, part, dataset, seed, trainer, cfg, shots))

    wanted = {"xd": XD_TARGETS + DG_TARGETS, "dg": FFT_TARGETS}.get(protocol, BENCHMARK)
    if protocol == "ttt":  # a ttt config serves one family of targets: ImageNet's variants or the other datasets
        wanted = tuple(d for family in (DG_TARGETS, XD_TARGETS) if targets & set(family) for d in family)
    report.not_run = [d for d in wanted if d not in targets]
    if protocol == "base2new":
        report.rows = base2new_rows(accuracies, published, ci95)
    else:
        report.rows = accuracy_rows(accuracies, protocol, ci95)
    return report


def print_group(key, report, seeds, ci95, name_backbone=False):
    protocol, trainer, cfg, shots = key
    amount = "all training images" if shots == ALL_SHOTS else f"{shots} shots"
    if protocol == "ttt":
        amount = f"from a model trained on {amount}" if shots else "from the identity head"
    backbone = f" | backbone {report.backbone}" if name_backbone else ""
    metric = f" | metric {report.metric}" if report.metric != DEFAULT_METRIC else ""
    print(f"== {protocol} | trainer {trainer} | config {cfg} | {amount}{backbone}{metric} | "
          f"seeds {' '.join(map(str, seeds))} ==")
    if report.finished:
        print(render_table(protocol, report.rows, ci95, report.metric))
    else:
        print("(no finished run)")
    sections = [
        ("Missing runs", report.missing),
        ("Unfinished runs (still running, stopped or crashed)", report.unfinished),
        ("Rejected runs (the log contradicts its folder; not counted)", report.rejected),
        ("Read from Dassl's one-decimal `* accuracy:` line (no `* result:` line: a log written by another tool)",
         report.fallback),
        (f"Finished runs without {report.metric} (logs give only the accuracy; not counted)", report.without_metric),
        ("Seed folders outside --seeds (not counted)", report.ignored_seeds),
    ]
    for title, lines in sections:
        if lines:
            print(f"{title}: {len(lines)}")
            for line in lines:
                print(f"  {line}")
    if report.not_run:
        print(f"Not run: {' '.join(report.not_run)}")
    print()


def print_published_averages(published):
    rows = [[method + (" (secondary source, unconfirmed)" if numbers.source.lower().startswith("secondary") else ""),
             *(f"{x:.2f}" for x in numbers[:3])]
            for (dataset, method), numbers in published.items() if dataset == "average"]
    print(f"== published base-to-new averages over the 11 datasets (ViT-B/16, 16 shots; sources in {BASELINES_CSV.name}) ==")
    print(tabulate(rows, headers=["method", "base", "new", "HM"], tablefmt="github", disable_numparse=True))
    print()


def print_published_fft():
    rows = [[method, f"{imagenet:.1f}", f"{shifts:.1f}", source] for method, imagenet, shifts, source in FFT_PUBLISHED]
    print("== published full fine-tuning on ImageNet (ViT-B/16) ==")
    print(tabulate(rows, headers=["method", "ImageNet", "mean of the 5 shifts", "source"], tablefmt="github",
                   disable_numparse=True))
    print()


def write_csv(path, summaries, ci95):
    spread = "ci95" if ci95 else "std"
    columns = ["protocol", "trainer", "cfg", "shots", "backbone", "metric", "dataset",
               "base_mean", f"base_{spread}", "base_seeds", "new_mean", f"new_{spread}", "new_seeds", "hm",
               "acc_mean", f"acc_{spread}", "acc_seeds"]
    try:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for (protocol, trainer, cfg, shots), report in summaries:
                for row in report.rows:
                    record = {"protocol": protocol, "trainer": trainer, "cfg": cfg, "shots": shots_text(shots),
                              "backbone": report.backbone, "metric": report.metric, "dataset": row.label}
                    for column, value in row.values.items():
                        if isinstance(value, Stat):
                            record.update({f"{column}_mean": round(value.mean, 4),
                                           f"{column}_{spread}": round(value.spread, 4), f"{column}_seeds": value.n})
                        elif value is not None:  # HM, and the averages (plain means)
                            record["hm" if column == "hm" else f"{column}_mean"] = round(value, 4)
                    writer.writerow(record)
    except OSError as error:
        raise ResultsError(f"cannot write the CSV file {path}: {error.strerror}") from None


def resolve_root(output_dir, protocol):
    """The output root and the protocols to read; a protocol folder (e.g. output/base2new) is accepted too."""
    root = Path(output_dir)
    if not root.is_dir():
        raise ResultsError(f"the output folder {root} does not exist. Give the folder the scripts wrote to "
                 "(./output unless OUTPUT was set).")
    if root.name in PROTOCOLS and not any((root / p).is_dir() for p in PROTOCOLS):
        if protocol and protocol != root.name:
            raise ResultsError(f"{root} is the {root.name} protocol folder, but --protocol {protocol} was given")
        return root.parent, [root.name]
    return root, [protocol] if protocol else list(PROTOCOLS)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", help="the output root of scripts/rada/*.sh (e.g. output)")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), help="only this protocol (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="expected seeds (default: 1 2 3)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, metavar="NAME",
                        help="the metric shown: any metric of the runs' records, e.g. macro_f1 or zero_shot_accuracy "
                        "(default: accuracy; runs read from logs have only that)")
    parser.add_argument("--ci95", action="store_true", help="show the 95%% confidence interval instead of the std")
    parser.add_argument("--csv", metavar="PATH", help="also write the tables to this CSV file")
    parser.add_argument("--plot", metavar="FILE", help="also draw each table as a bar chart into this PNG file "
                        "(one file per table, named after it, when there are several)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        return report(args)
    except ResultsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def check_metric(metric, runs):
    """A metric that no finished run reports is a typo or a metric of another version: one error line."""
    found = sorted({name for run in runs if run.state and run.state.finished for name in run.state.metrics})
    if found and metric not in found:
        raise ResultsError(f"no finished run reports the metric {metric!r}; the runs read report: {', '.join(found)} "
                           "(choose one with --metric)")


def report(args):
    """Prints the tables; the exit status is 1 when no finished run was found."""
    seeds = sorted(set(args.seeds))
    root, protocols = resolve_root(args.output_dir, args.protocol)
    runs, odd_folders = discover_runs(root, protocols)
    check_metric(args.metric, runs)
    published = load_published()

    runs_by_table = defaultdict(list)
    for run in runs:
        runs_by_table[run.table].append(run)
    order = list(PROTOCOLS)

    def table_order(table):  # a group's ViT-B/16 table first, beside the published numbers
        (protocol, *rest), backbone = table
        return order.index(protocol), rest, backbone != OPENAI_DEFAULT_BACKBONE, backbone

    summaries = [(key, summarise_group(key, runs_by_table[(key, backbone)], root, seeds, published, args.ci95,
                                       backbone, args.metric))
                 for key, backbone in sorted(runs_by_table, key=table_order)]

    name_backbones = any(report.backbone != OPENAI_DEFAULT_BACKBONE for _, report in summaries)
    for key, report in summaries:
        print_group(key, report, seeds, args.ci95, name_backbones)
    if odd_folders:
        print(f"Folders not named shots_<K>/.../seed<S> (not read): {' '.join(map(str, odd_folders))}")
    if any(key[0] == "base2new" and report.finished and report.beside_published for key, report in summaries):
        print_published_averages(published)
    if any(key[0] == "dg" and report.finished and report.beside_published for key, report in summaries):
        print_published_fft()

    if not any(report.finished for _, report in summaries):
        if runs:
            print(f"error: none of the {len(runs)} run folder(s) under {root} holds a finished run "
                  "(see the unfinished and missing runs above)", file=sys.stderr)
        else:
            part = parts_of(protocols[0])[0]
            print(f"error: no run folder found under {root} for {', '.join(protocols)}: expected folders such as "
                  f"{root / part.folder}/<dataset>/shots_<K>/<trainer>/<cfg>/seed<S>/log.txt, "
                  "as written by scripts/rada/*.sh", file=sys.stderr)
        return 1
    if args.csv:
        write_csv(args.csv, summaries, args.ci95)
        print(f"Wrote {args.csv}")
    if args.plot:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, home of figures/
        from figures.results import plot_results  # matplotlib only when charts are asked for

        print("\n".join(f"Wrote {path}" for path in plot_results(args.plot, summaries, published, args.ci95)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
