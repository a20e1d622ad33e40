"""The results contract, defined once: the results file of a run folder (one record per evaluation),
the `* result:` line our trainers print, the run-folder layout of the protocol scripts, when a run
folder holds a finished run, and the command that (re)creates a run. train.py,
scripts/parse_results.py and scripts/rada/common.sh (through the command line below) all ask this
module; it needs only the standard library.

    python -m trainers.runs.results finished RUN_DIR           # exit 0 when RUN_DIR holds a finished run
    python -m trainers.runs.results progress RUN_DIR           # how far its log got
    python -m trainers.runs.results check RUN_DIR [ARGV ...]   # skip (0), run (1) or stop (3), with the message
    python -m trainers.runs.results rerun SCRIPT ARG ... [--env KEY=VALUE ...] [--prefix PREFIX]

A run's state comes from its results file `results.jsonl` where the folder has one: train.py appends
a record (one JSON object per line) after every evaluation, its metrics as numbers, and marks the
final test evaluation of the run finished. Folders without one (runs of older versions, CoOp /
MaPLe logs) are read from their logs: `log.txt`, and the `log.txt-<timestamp>` that every rerun into
the same folder adds (Dassl's logger never overwrites), in the order they were written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserFacingError

# ---- the run-folder layout ------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One step of a protocol and the folder, script and class subset of its runs:
    <output root>/<folder>/<dataset>/shots_<K or all>/<trainer>/<cfg>/seed<S>/log.txt"""

    name: str
    protocol: str
    folder: str
    script: str
    subsample: str  # DATASET.SUBSAMPLE_CLASSES its `* result:` line must report
    trains_on_imagenet: bool = False  # its script takes only SEED: one ImageNet run serves every target


PARTS = (
    Part("train_base", "base2new", "base2new/train_base", "base2new_train.sh", "base"),
    Part("test_new", "base2new", "base2new/test_new", "base2new_test.sh", "new"),
    Part("fewshot", "fewshot", "fewshot", "fewshot.sh", "all"),
    Part("xd_train", "xd", "xd/train", "xd_train.sh", "all", trains_on_imagenet=True),
    Part("xd_test", "xd", "xd/test", "xd_test.sh", "all"),
    Part("dg_train", "dg", "dg/train", "dg_train.sh", "all", trains_on_imagenet=True),
    Part("dg_test", "dg", "dg/test", "dg_test.sh", "all"),
    Part("ttt", "ttt", "ttt", "ttt.sh", "all"),
)
PART = {part.name: part for part in PARTS}
PROTOCOLS = tuple(dict.fromkeys(part.protocol for part in PARTS))
ALL_SHOTS = -1  # shots_all: every training image (DATASET.NUM_SHOTS -1)
SHOTS_FOLDER = re.compile(r"shots_(\d+|all)")
SEED_FOLDER = re.compile(r"seed(\d+)")


def parts_of(protocol):
    return tuple(part for part in PARTS if part.protocol == protocol)


def layout_place(run_dir):
    """(part, cfg) of a run folder inside the scripts' layout, None for a folder elsewhere."""
    names = Path(os.path.abspath(run_dir)).parts
    if len(names) < 7 or not (SEED_FOLDER.fullmatch(names[-1]) and SHOTS_FOLDER.fullmatch(names[-4])):
        return None
    for part in PARTS:
        folder = tuple(part.folder.split("/"))
        start = len(names) - 5 - len(folder)
        if start >= 1 and names[start:-5] == folder:
            return part, names[-2]
    return None


def shots_text(shots):
    """The value of SHOTS (and of the shots_<K> folder name) for a shots number."""
    return "all" if shots == ALL_SHOTS else str(shots)


def rerun_command(script, args, env, prefix=""):
    """The shell command that runs scripts/rada/<script> with `args`, after the KEY=VALUE pairs of `env`."""
    assignments = " ".join(f"{key}={shlex.quote(str(value))}" for key, value in env.items())
    words = " ".join(shlex.quote(str(arg)) for arg in args)
    return f"{assignments} bash {shlex.quote(f'{prefix}scripts/rada/{script}')} {words}".strip()


def part_rerun_command(run_root, part, dataset, seed, trainer, cfg, shots):
    """The script call that creates the missing run of a part (as parse_results.py reports it)."""
    env = {"OUTPUT": run_root, "TRAINER": trainer, "CFG": cfg}
    part = PART[part]
    if part.name != "ttt":
        env["SHOTS"] = shots_text(shots)
    elif shots:  # ttt shots_K starts from the K-shot ImageNet model of xd_train.sh; shots_0 from the identity head
        env.update(PRETRAINED=1, SHOTS=shots)
    args = [seed] if part.trains_on_imagenet else [dataset, seed]
    return rerun_command(part.script, args, env)


# ---- the result line ------------------------------------------------------------------------------

RESULT_PREFIX = "* result:"
RESULT_FIELD = re.compile(r"(\w+)=(\S+)")
# The backbone comes last and runs to the end of the line: a local file's path may hold spaces.
BACKBONE_FIELD = " backbone="
# The backbone of the published numbers, and of every shipped config that names no other.
OPENAI_DEFAULT_BACKBONE = "ViT-B/16"


def backbone_identity(name, weights=""):
    """The backbone of a run as results name it: MODEL.BACKBONE.NAME, with .WEIGHTS where set."""
    return f"{name} (weights {weights})" if weights else name


def result_line(*, dataset, subsample, split, shots, seed, trainer, accuracy, backbone):
    """The line train.py prints after each evaluation (accuracy in percent, two decimals)."""
    return (f"{RESULT_PREFIX} dataset={dataset} subsample={subsample} split={split} shots={shots} seed={seed} "
            f"trainer={trainer} accuracy={accuracy:.2f}%{BACKBONE_FIELD}{backbone}")


def result_fields(line):
    """{field: value} of a `* result:` line; logs written before the backbone field have no "backbone"."""
    text, _, backbone = line[len(RESULT_PREFIX):].partition(BACKBONE_FIELD)
    fields = dict(RESULT_FIELD.findall(text))
    if backbone:
        fields["backbone"] = backbone
    return fields


# ---- the results file: one record per evaluation --------------------------------------------------

RECORDS_NAME = "results.jsonl"
RECORD_FORMAT = 1
RESULT_FIELDS = ("dataset", "subsample", "split", "shots", "seed", "trainer", "backbone")  # those of the result line
RECORD_KEYS = ("split", "finished", "metrics")  # what reading a run's state needs of every record
DEFAULT_METRIC = "accuracy"  # the metric results show unless asked for another; the only one logs give
TAIL_CHUNK = 4096


def evaluation_record(*, run_dir, dataset, subsample, split, shots, seed, trainer, backbone, metrics, finished):
    """The record of one evaluation of the run in run_dir, for append_record.

    metrics: the evaluator's {name: value} (Dassl's accuracy, error_rate, macro_f1 in percent) and what
    a trainer adds (zero_shot_accuracy for test-time training). finished: True for the run's final
    test evaluation, False for an intermediate one. backbone as backbone_identity names it. The config
    name and the protocol come from the folder's place in the scripts' layout; outside it the config is
    the stem of the --config-file that run.json records, and the protocol "".
    """
    if not metrics:
        raise ValueError("an evaluation record needs at least one metric")
    place = layout_place(run_dir)
    return {
        "format": RECORD_FORMAT,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished": bool(finished),
        "protocol": place[0].protocol if place else "",
        "config": place[1] if place else _config_file_stem(run_dir),
        "dataset": dataset,
        "subsample": subsample,
        "split": split,
        "shots": int(shots),
        "seed": int(seed),
        "trainer": trainer,
        "backbone": backbone,
        "metrics": {str(name): float(value) for name, value in metrics.items()},  # tensors and numpy scalars too
    }


def _config_file_stem(run_dir):
    argv = read_run_record(run_dir).get("argv", [])
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--config-file":
            return Path(value).stem
    return ""


def append_record(run_dir, record):
    """Appends `record` to run_dir/results.jsonl as one line, on disk when this returns.

    The whole line goes out in one write, then fsync: a process killed meanwhile leaves at most an
    incomplete last line, which read_records skips and the next append cuts off first.
    """
    line = (json.dumps(record) + "\n").encode("utf-8")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    descriptor = os.open(Path(run_dir) / RECORDS_NAME, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        _cut_incomplete_line(descriptor)
        written = 0
        while written < len(line):  # a regular file takes it at once; a partial write is resumed, not lost
            written += os.write(descriptor, line[written:])
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _cut_incomplete_line(descriptor):
    """Truncates the file after its last newline (a no-op for a file that ends with one)."""
    end = position = os.lseek(descriptor, 0, os.SEEK_END)
    keep = 0
    while position > 0:
        start = max(0, position - TAIL_CHUNK)
        os.lseek(descriptor, start, os.SEEK_SET)
        newline = os.read(descriptor, position - start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        position = start
    if keep < end:
        os.ftruncate(descriptor, keep)


def read_records(run_dir):
    """The records of run_dir/results.jsonl, oldest first ([] without that file).

    An incomplete last line (a write cut short by a kill) is skipped; any other line that is not a
    record is a ResultsError naming the file, the line and the fix.
    """
    path = Path(run_dir) / RECORDS_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ResultsError(f"{path} is unreadable ({error.strerror}); make it readable, or delete it to read "
                           "the run from its log.txt.") from None
    *lines, _incomplete = data.split(b"\n")  # what follows the last newline: nothing, or a torn write
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise ResultsError(_bad_record(path, number, f"not JSON: {error}")) from None
        if not isinstance(record, dict):
            raise ResultsError(_bad_record(path, number, "not a JSON object"))
        absent = [key for key in RECORD_KEYS if key not in record]
        if absent or not isinstance(record["metrics"], dict):
            raise ResultsError(_bad_record(path, number, f"no {', '.join(absent) or 'metrics object'}"))
        records.append(record)
    return records


def _bad_record(path, number, why):
    return (f"{path}, line {number} is not an evaluation record ({why}). train.py writes one line per "
            "evaluation; delete that line, or the whole file to read the run from its log.txt instead.")


# ---- reading logs ---------------------------------------------------------------------------------

LOG_NAME = "log.txt"
DASSL_ACCURACY = re.compile(r"\* accuracy: ([0-9.]+)%")
EPOCH = re.compile(r"epoch \[(\d+)/(\d+)\](?: batch \[(\d+)/(\d+)\])?")
EVALUATED_SPLIT = re.compile(r"Evaluate on the \*(\w+)\* set")
FINISHED_TRAINING = re.compile(r"Finish(ed)? training")


@dataclass
class RunState:
    """What a run folder (its records, else its logs) or one log says: finished when it holds the test
    result of a complete run, whose metrics (a log gives only the accuracy) are in `metrics`."""

    metrics: dict  # {} for a run that is not finished
    fields: dict = field(default_factory=dict)  # the result line's metadata (a record's fields, as text)
    from_dassl_line: bool = False  # read from Dassl's one-decimal `* accuracy:` line (other tools' logs)
    progress: str = ""  # how far an unfinished run got
    reached: str = ""  # its last epoch line as printed, e.g. "epoch [3/5] batch [20/40]"
    informative: bool = True  # it shows training or a result (a run that crashed at start-up does not)

    @property
    def finished(self):
        return bool(self.metrics)

    @property
    def accuracy(self):
        """The accuracy (percent) of a finished run, None otherwise."""
        return self.metrics.get("accuracy")


def parse_log(path):
    """Reads one log file.

    The result is our last `* result: ... split=test ... accuracy=X%` line, else (logs written by
    CoOp, MaPLe or other Dassl tools) the last `* accuracy: X%` line that is not part of a
    validation block. A log that shows training epochs but no `Finish training` line (Dassl older
    than 0.6.1 prints `Finished training`) is unfinished whatever it printed.
    """
    ours = dassl = last_epoch = None
    evaluated_split = None
    started = trained = False
    last_line = ""
    with open(path, encoding="utf-8", errors="replace") as log:
        for raw_line in log:
            line = raw_line.strip()
            if not line:
                continue
            last_line = line
            if match := EPOCH.match(line):
                started, last_epoch = True, match
            elif FINISHED_TRAINING.match(line):
                trained = True
            elif match := EVALUATED_SPLIT.match(line):
                evaluated_split = match.group(1)
            elif line.startswith(RESULT_PREFIX):
                fields = result_fields(line)
                if fields.get("split", "test") == "test" and _accuracy_of(fields) is not None:
                    ours = fields
            elif match := DASSL_ACCURACY.match(line):
                if evaluated_split in (None, "test"):
                    dassl = float(match.group(1))

    reached = last_epoch.group(0) if last_epoch else ""
    if started and not trained:
        epoch, epochs, batch, batches = last_epoch.groups()
        where = f"stopped at epoch {epoch}/{epochs}" + (f", batch {batch}/{batches}" if batch else "")
        return RunState({}, progress=where, reached=reached)
    if ours is not None:
        return RunState({"accuracy": _accuracy_of(ours)}, fields=ours, reached=reached)
    if dassl is not None:
        return RunState({"accuracy": dassl}, from_dassl_line=True, reached=reached)
    if trained:
        return RunState({}, progress="training finished but the log has no test result", reached=reached)
    if not last_line:
        return RunState({}, progress="log.txt is empty", informative=False)
    return RunState({}, progress=f"no training epoch or test result; last line: {last_line[:100]!r}",
                    informative=False)


def _accuracy_of(fields):
    try:
        return float(fields.get("accuracy", "").rstrip("%"))
    except ValueError:
        return None


def log_files(run_dir):
    """log.txt and the log.txt-<timestamp> files of later runs into the same folder, oldest first."""
    run_dir = Path(run_dir)
    later = sorted(p for p in run_dir.glob(f"{LOG_NAME}-*") if p.is_file())
    first = run_dir / LOG_NAME
    return ([first] if first.is_file() else []) + later


def read_run(run_dir):
    """The state of a run folder (None: no log and no results file).

    With a results file, the run is finished when a record of a final test evaluation is in it
    (the last such record is the result); how far its training got still comes from the logs.
    Without one, the state comes from the logs alone, as read_logs reads them.
    """
    logs = read_logs(run_dir)
    if not (Path(run_dir) / RECORDS_NAME).is_file():
        return logs
    reached = logs.reached if logs else ""
    final = [record for record in read_records(run_dir) if record["finished"] is True and record["split"] == "test"]
    if final:
        fields = {key: str(final[-1][key]) for key in RESULT_FIELDS if key in final[-1]}
        return RunState(dict(final[-1]["metrics"]), fields=fields, reached=reached)
    if logs and not logs.finished:
        return RunState({}, progress=logs.progress, reached=reached)
    return RunState({}, progress=f"{RECORDS_NAME} holds no final test evaluation", reached=reached)


def read_logs(run_dir):
    """The state of a run folder from all its logs (None: no log at all).

    Each log is one process. The run is where the latest log that shows training or a result
    left it: a run killed and resumed is finished when the resumed process finished, and a later
    process that stopped before doing anything (e.g. on a bad option) changes nothing.
    """
    results = [parse_log(path) for path in log_files(run_dir)]
    if not results:
        return None
    informative = [result for result in results if result.informative]
    return informative[-1] if informative else results[-1]


def run_finished(run_dir):
    state = read_run(run_dir)
    return state is not None and state.finished


def run_progress(run_dir):
    """How far an unfinished run got, as its log printed it."""
    state = read_run(run_dir)
    if state is None:
        return "no log.txt"
    return state.reached or "no epoch reached"


# ---- the run record: what was asked of a run folder -----------------------------------------------

RUN_RECORD = "run.json"
# train.py flags that name no property of the experiment: where things are, not what is computed.
LOCATION_FLAGS = ("--root", "--output-dir", "--resume")
VALUELESS_FLAGS = ("--eval-only", "--no-train")
CONFIG_FILE_FLAGS = ("--config-file", "--dataset-config-file")
# Resolved config keys that may change between a run and its resumption.
LOCATION_KEYS = ("OUTPUT_DIR", "RESUME", "DATASET.ROOT", "MODEL.BACKBONE.CACHE_DIR", "TRAIN.PRINT_FREQ")


def request_of(argv):
    """{option: value} of a train.py command line (argv without the program), config files by
    their content, so that the same experiment asked from another directory compares equal."""
    request, words = {}, list(argv)
    while words:
        word = words.pop(0)
        if word.startswith("--"):
            if word in VALUELESS_FLAGS:
                request[word] = True
                continue
            value = words.pop(0) if words else ""
            if word in CONFIG_FILE_FLAGS:
                value = _content_digest(value)
            if word not in LOCATION_FLAGS:
                request[word] = value
        else:  # trailing yacs KEY VALUE pairs
            request[word] = words.pop(0) if words else ""
    return request


def _content_digest(path):
    try:
        return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return f"unreadable {path}"


def differences(stored, current, ignore=()):
    """'KEY: was A, now B' for every key whose value differs (absent keys show as 'unset')."""
    changed = []
    for key in sorted(set(stored) | set(current)):
        if key in ignore or stored.get(key) == current.get(key):
            continue
        before, after = stored.get(key, "unset"), current.get(key, "unset")
        if isinstance(before, str) and before.startswith("sha256:"):
            changed.append(f"{key} (the file's content changed)")
        else:
            changed.append(f"{key}: was {before}, now {after}")
    return changed


def flatten_config(node, prefix=""):
    """{'OPTIM.MAX_EPOCH': 5, ...} of a (yacs) config, values as JSON stores them (tuples become lists)."""
    flat = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = json.loads(json.dumps(value, default=str))
    return flat


def config_differences(stored, current):
    """The settings (flattened configs) that differ, ignoring where files are (LOCATION_KEYS). A
    config holds every key of the version that wrote it, so a key only one side has was added (or
    removed) between versions: not a changed setting, and a run recorded before it still resumes."""
    version_keys = set(stored) ^ set(current)
    return differences(stored, current, ignore=(*LOCATION_KEYS, *version_keys))


def other_settings_message(run_dir, changed, why=""):
    """What train.py says when `run_dir` holds a run whose settings differ (`changed`, from
    config_differences) and so may not be reused or resumed; `why` adds the consequence."""
    return (f"{run_dir} holds a run made with other settings ({'; '.join(changed)}){why}. Give this run another "
            "--output-dir (the scripts: a new OUTPUT or CFG name), or delete that folder to run it again "
            "(the scripts: FORCE=1).")


def read_run_record(run_dir):
    """The run record of a folder, {} when it has none (runs of other tools or older versions)."""
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ResultsError(f"{path} is unreadable ({error}); delete it, or the whole run folder to retrain.") from None
    return record if isinstance(record, dict) else {}


def write_run_record(run_dir, argv, config):
    """Stores what was asked (the command line) and the resolved configuration with the run, atomically."""
    path = Path(run_dir) / RUN_RECORD
    partial = path.with_name(path.name + ".partial")
    record = {"argv": list(argv), "request": request_of(argv), "config": config}
    partial.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(partial, path)


class ResultsError(UserFacingError):
    """A results file or folder that cannot be read as the contract says; the message names the fix."""


# ---- what a protocol script does with a run folder ------------------------------------------------

RUN, SKIP, STOP = 1, 0, 3
RETRAIN_CHOICES = ("use a new OUTPUT or CFG name to keep both runs, or set FORCE=1 to delete it and run again")


def check_run(run_dir, argv):
    """(decision, message) for a script about to run train.py with `argv` into run_dir."""
    state = read_run(run_dir)
    stored = read_run_record(run_dir).get("request")
    if stored is not None:
        changed = differences(stored, request_of(argv))
        if changed:
            what = "a finished run" if state is not None and state.finished else "a run"
            return STOP, (f"{run_dir} holds {what} made with other settings ({'; '.join(changed)}): "
                          f"{RETRAIN_CHOICES}.")
    if state is None:
        return RUN, ""
    if state.finished:
        return SKIP, (f"Skipping: {run_dir} already holds a finished run (delete that folder, or set FORCE=1, "
                      "to run it again).")
    return RUN, (f"Found an unfinished run in {run_dir} (log reached: {run_progress(run_dir)}); running it again "
                 "(training resumes from its last complete checkpoint).")


class KeptResults:
    """A Dassl-style evaluator (reset / process / evaluate), unchanged in every other respect, whose
    last results, every metric, stay readable as `results`: Dassl's evaluation loop returns only the
    first."""

    def __init__(self, evaluator):
        self._wrapped = evaluator
        self.results = {}

    def __getattr__(self, name):  # only for what this class does not define
        if name == "_wrapped":  # not set yet (e.g. a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self._wrapped, name)

    def evaluate(self):
        self.results = dict(self._wrapped.evaluate())
        return self.results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m trainers.runs.results", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("finished", "progress"):
        commands.add_parser(name).add_argument("run_dir")
    check = commands.add_parser("check")
    check.add_argument("run_dir")
    check.add_argument("argv", nargs=argparse.REMAINDER)
    rerun = commands.add_parser("rerun")
    rerun.add_argument("script")
    rerun.add_argument("args", nargs="*")
    rerun.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE")
    rerun.add_argument("--prefix", default="")
    args = parser.parse_args(argv)
    try:
        if args.command == "finished":
            return 0 if run_finished(args.run_dir) else 1
        if args.command == "progress":
            print(run_progress(args.run_dir))
            return 0
        if args.command == "check":
            decision, message = check_run(args.run_dir, args.argv)
            if decision == STOP:
                print(f"error: {message}", file=sys.stderr)
            elif message:
                print(message)
            return decision
        env = dict(pair.partition("=")[::2] for pair in args.env)
        print(rerun_command(args.script, args.args, env, args.prefix))
        return 0
    except ResultsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
