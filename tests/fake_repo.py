"""A copy of scripts/rada/ in a fake repository, with configs written by the test and a stub
`python` first on PATH that records the train.py command line instead of running it, torchrun's
(`python -m torch.distributed.run ... train.py ...`) too; the scripts' questions to
trainers.runs.results (`python -m trainers.runs.results ...`) go to the real interpreter."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Every variable the scripts read; cleared so that the caller's environment cannot leak in.
SCRIPT_ENV = ("DATA", "OUTPUT", "TRAINER", "CFG", "SHOTS", "LOADEP", "PRETRAINED", "MODEL_DIR", "SOURCE_CFG", "GPUS",
              "TORCHRUN_ARGS", "FORCE")


def make_fake_repo(tmp_path, datasets, trainer_configs, config_text="OPTIM:\n  MAX_EPOCH: 1\n"):
    """tmp_path/repo with the scripts, configs/datasets/<stem>.yaml for each dataset stem,
    configs/trainers/<trainer>/<name>.yaml for each {trainer: names}, and an empty data/."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copytree(REPO / "scripts" / "rada", root / "scripts" / "rada")
    shutil.copy(REPO / "scripts" / "setup_env.sh", root / "scripts")
    for module in ("trainers/__init__.py", "trainers/runs/__init__.py", "trainers/errors.py",
                   "trainers/runs/results.py"):
        (root / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / module, root / module)
    (root / "configs" / "datasets").mkdir(parents=True)
    for stem in datasets:
        (root / "configs" / "datasets" / f"{stem}.yaml").write_text(f"DATASET:\n  NAME: {stem}\n")
    for trainer, names in trainer_configs.items():
        (root / "configs" / "trainers" / trainer).mkdir(parents=True)
        for name in names:
            (root / "configs" / "trainers" / trainer / f"{name}.yaml").write_text(config_text)
    (root / "data").mkdir()
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" != torch.distributed.run ]; then exec {sys.executable} "$@"; fi\n'
                    'printf "%s\\n" "$@" > "$STUB_ARGV"\n')
    stub.chmod(0o755)
    return root


def run_script(repo, script, *args, cwd=None, **env):
    """Runs scripts/rada/<script>; returns (completed process, argv the stub python got or None)."""
    return run_shell(repo, ["bash", str(repo / "scripts" / "rada" / script), *map(str, args)], cwd=cwd, **env)


def run_shell(repo, command, cwd=None, **env):
    """Runs `command` (a list, or a shell line such as a hint the scripts print) as run_script does."""
    argv_file = repo.parent / "argv.txt"
    argv_file.unlink(missing_ok=True)
    environment = {key: value for key, value in os.environ.items() if key not in SCRIPT_ENV}
    environment.update(PATH=f"{repo.parent / 'bin'}{os.pathsep}{os.environ['PATH']}", RADA_SKIP_SETUP="1",
                       STUB_ARGV=str(argv_file), **env)
    if isinstance(command, str):
        command = ["bash", "-c", command]
    result = subprocess.run(command, cwd=cwd or repo, env=environment, capture_output=True, text=True, timeout=60,
                            check=False)
    argv = argv_file.read_text().splitlines() if argv_file.exists() else None
    return result, argv


def train_py(seed, trainer, dataset, cfg, output_dir, root="./data"):
    """The train.py command line the scripts start with."""
    return ["train.py", "--root", root, "--seed", str(seed), "--trainer", trainer,
            "--dataset-config-file", f"configs/datasets/{dataset}.yaml",
            "--config-file", f"configs/trainers/{trainer}/{cfg}.yaml", "--output-dir", output_dir]


def finish(repo, run_dir, log_text):
    """Writes log_text as the log of run_dir (relative to the repository)."""
    path = repo / run_dir
    path.mkdir(parents=True, exist_ok=True)
    (path / "log.txt").write_text(log_text)
