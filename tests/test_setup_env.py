"""scripts/setup_env.sh: the user's own environment when it has what we need, .venv otherwise."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHOSEN = 'source scripts/setup_env.sh && echo "python=$(command -v python)"'


def fake_repo(tmp_path):
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup_env.sh", root / "scripts")
    (root / "requirements.txt").write_text("yacs\n")
    return root


def interpreter(path, *flags):
    """A `python` that runs the interpreter of this test run (with flags, e.g. -S: no site-packages)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {" ".join(flags)} "$@"\n')
    path.chmod(0o755)
    return path


def source_setup(root, bin_dir, **env):
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("RADA_") and key not in ("PYTHON", "VIRTUAL_ENV")}
    environment.update(PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", **env)
    done = subprocess.run(["bash", "-c", CHOSEN], cwd=root, env=environment, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().rpartition("python=")[2], done.stderr


def test_an_environment_with_everything_is_used_as_it_is(tmp_path):
    root = fake_repo(tmp_path)
    interpreter(tmp_path / "bin" / "python")
    chosen, messages = source_setup(root, tmp_path / "bin")
    own = str(Path(sys.executable).parent / "python")
    assert chosen == own
    assert f"using your Python environment: {own}" in messages and "RADA_VENV" in messages
    assert not (root / ".venv").exists()


def test_an_environment_without_torch_falls_back_to_venv_and_says_so(tmp_path):
    root = fake_repo(tmp_path)
    interpreter(tmp_path / "bin" / "python", "-S")  # no site-packages: no torch, no clip
    venv = root / ".venv"
    interpreter(venv / "bin" / "python")
    (venv / ".requirements.sha256").write_text(hashlib.sha256(b"yacs\n").hexdigest() + "\n")
    chosen, messages = source_setup(root, tmp_path / "bin")
    assert chosen == str(venv / "bin" / "python")
    assert "lacks torch" in messages and "clip" in messages
    assert "RADA_VENV=DIR" in messages and f"using the virtual environment {venv}" in messages
    assert "installing" not in messages  # requirements.txt unchanged since the stamp


def test_rada_venv_wins_and_skip_setup_leaves_path_alone(tmp_path):
    root = fake_repo(tmp_path)
    interpreter(tmp_path / "bin" / "python")
    chosen_venv = tmp_path / "chosen"
    interpreter(chosen_venv / "bin" / "python")
    (chosen_venv / ".requirements.sha256").write_text(hashlib.sha256(b"yacs\n").hexdigest() + "\n")
    chosen, messages = source_setup(root, tmp_path / "bin", RADA_VENV=str(chosen_venv))
    assert chosen == str(chosen_venv / "bin" / "python") and "RADA_VENV is set" in messages
    chosen, messages = source_setup(root, tmp_path / "bin", RADA_SKIP_SETUP="1")
    assert chosen == str(tmp_path / "bin" / "python") and messages == ""
