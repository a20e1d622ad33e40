"""Run train.py end to end, as users do, on the synthetic dataset with the tiny CLIP.

    from tests.train_harness import TrainRun

    def test_something(synthetic_data_root, tiny_clip_path, tmp_path):
        run = TrainRun("RAdaCoOp", "vit_b16_ep50_ctxv1", synthetic_data_root, tiny_clip_path, tmp_path)
        result = run.train()                  # one epoch on the base classes, then base test
        assert result.accuracy is not None
        result = run.evaluate()               # --eval-only --model-dir <train dir> on new classes

`synthetic_data_root` and `tiny_clip_path` are fixtures of tests/conftest.py. Every run is a subprocess of `python train.py` with CoOp's command line; the options below
only shrink the job (one epoch, 4 shots, no loader workers). `TrainRun(..., in_process=True)` calls
`train.main(argv)` in the test's own process instead (no interpreter start, no torch and Dassl
imports per run): for runs that end early, such as configuration errors.
"""

import contextlib
import io
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_OPTIONS = [
    "OPTIM.MAX_EPOCH", "1",
    "DATASET.NUM_SHOTS", "4",
    "DATALOADER.NUM_WORKERS", "0",
    "DATALOADER.TRAIN_X.BATCH_SIZE", "8",
    "DATALOADER.TEST.BATCH_SIZE", "64",
    "TRAIN.PRINT_FREQ", "1",
]
RESULT_LINE = re.compile(r"^\* result: .*accuracy=([0-9.]+)%", re.MULTILINE)


@dataclass
class RunResult:
    returncode: int
    output: str
    output_dir: str

    @property
    def accuracy(self):
        found = RESULT_LINE.findall(self.output)
        return float(found[-1]) if found else None

    @property
    def log(self):
        with open(os.path.join(self.output_dir, "log.txt")) as handle:
            return handle.read()


class _Capture(io.StringIO):
    def close(self):
        """Kept open: Dassl's Logger closes its console (this) when it is collected."""


def run_train_in_process(argv):
    """(exit code, stdout + stderr) of train.main(argv) run in this process, on the CPU.

    What train.py sets up for the whole process is undone afterwards: Dassl's log file replacing
    sys.stdout, and the handlers of the root logger."""
    import train

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    captured = _Capture()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            code = train.main([*argv, "USE_CUDA", "False"])
            log_file = getattr(sys.stdout, "file", None)  # Dassl's Logger, when train.py got that far
            if log_file is not None:
                log_file.close()
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    return code, captured.getvalue()


class TrainRun:
    def __init__(self, trainer, config, data_root, clip_path, workdir, dataset="synthetic_shapes", seed=1,
                 in_process=False):
        self.trainer, self.config, self.dataset, self.seed = trainer, config, dataset, seed
        self.in_process = in_process
        self.data_root, self.clip_path, self.workdir = data_root, str(clip_path), str(workdir)
        self.train_dir = os.path.join(self.workdir, "train_base")
        self.test_dir = os.path.join(self.workdir, "test_new")

    def command(self, output_dir, *extra, options=()):
        return [
            sys.executable, os.path.join(REPO, "train.py"),
            "--root", self.data_root, "--seed", str(self.seed), "--trainer", self.trainer,
            "--dataset-config-file", os.path.join(REPO, "configs", "datasets", f"{self.dataset}.yaml"),
            "--config-file", os.path.join(REPO, "configs", "trainers", self.trainer, f"{self.config}.yaml"),
            "--output-dir", output_dir, *extra,
            *FAST_OPTIONS, "MODEL.BACKBONE.NAME", self.clip_path, *options,
        ]

    def run(self, command, output_dir, timeout=600):
        if self.in_process:
            return RunResult(*run_train_in_process(command[2:]), output_dir)  # without python train.py
        env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        return RunResult(done.returncode, done.stdout + done.stderr, output_dir)

    def train(self, *options, subsample="base"):
        command = self.command(self.train_dir, options=("DATASET.SUBSAMPLE_CLASSES", subsample, *options))
        return self.run(command, self.train_dir)

    def evaluate(self, *options, subsample="new", model_dir=None, load_epoch=None):
        extra = ["--eval-only", "--model-dir", model_dir or self.train_dir]
        if load_epoch is not None:
            extra += ["--load-epoch", str(load_epoch)]
        command = self.command(self.test_dir, *extra, options=("DATASET.SUBSAMPLE_CLASSES", subsample, *options))
        return self.run(command, self.test_dir)
