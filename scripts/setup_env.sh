#!/usr/bin/env bash
# Choose the Python environment the scripts run in; sourced by every script. In this order:
#   RADA_SKIP_SETUP=1   PATH is left as it is (the script tests put a stub `python` first on PATH).
#   RADA_VENV=DIR       that virtual environment, created with requirements.txt if it is missing.
#   your environment    the `python` on PATH (e.g. an activated conda env or venv; PYTHON=... names
#                       another interpreter) when it can import what the scripts need: it is used
#                       as it is, nothing is installed into it (except Dassl with RADA_WITH_DASSL=1).
#   .venv               otherwise: the repository's .venv, created on first use with requirements.txt
#                       and re-installed when requirements.txt changes.
# RADA_WITH_DASSL=1 also installs Dassl (not on PyPI) from its GitHub repository into the chosen
# environment when it lacks it; its run-time dependencies are in requirements.txt.
# RADA_NEEDS adds module names the calling script needs (test.sh: pytest).
set -euo pipefail
if [ "${RADA_SKIP_SETUP:-0}" = 1 ]; then
    return 0 2>/dev/null || exit 0
fi
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# What train.py and the scripts import (module names; requirements.txt has the packages).
RADA_MODULES="torch torchvision clip yacs tabulate PIL numpy tqdm ftfy regex ${RADA_NEEDS:-}"

# Prints "missing: <modules>" or "ok: <sys.executable>" for an interpreter, without importing anything.
_rada_probe() {
    "$1" - $RADA_MODULES <<'PY' 2>/dev/null
import importlib.util, sys
missing = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is None]
print(f"missing: {' '.join(missing)}" if missing else f"ok: {sys.executable}")
PY
}

_rada_use_venv() {
    local venv="$1" why="$2"
    if [ ! -x "$venv/bin/python" ]; then
        echo "[setup] $why: creating the virtual environment $venv (first run: a few minutes, several GB)" >&2
        "${PYTHON:-python3}" -m venv "$venv"
    else
        echo "[setup] $why: using the virtual environment $venv" >&2
    fi
    local stamp="$venv/.requirements.sha256" want
    want="$(sha256sum "$REPO_ROOT/requirements.txt" | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "[setup] installing requirements.txt into $venv" >&2
        "$venv/bin/python" -m pip install --quiet -r "$REPO_ROOT/requirements.txt"
        echo "$want" > "$stamp"
    fi
    RADA_PYTHON="$venv/bin/python"
}

_rada_has_dassl() {
    "$1" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('dassl') is None)" 2>/dev/null
}

# Chosen already by the script that called this one (its PATH is inherited).
if [ -n "${RADA_PYTHON:-}" ] && [ "$(command -v python)" = "$RADA_PYTHON" ] && { [ "${RADA_WITH_DASSL:-0}" != 1 ] \
        || _rada_has_dassl "$RADA_PYTHON"; }; then
    return 0 2>/dev/null || exit 0
fi
if [ -n "${RADA_VENV:-}" ]; then
    _rada_use_venv "$RADA_VENV" "RADA_VENV is set"
else
    _rada_candidate="${PYTHON:-python}"
    command -v "$_rada_candidate" >/dev/null 2>&1 || _rada_candidate=python3
    _rada_probe_result="$(command -v "$_rada_candidate" >/dev/null 2>&1 && _rada_probe "$_rada_candidate" || true)"
    _rada_probe_result="${_rada_probe_result:-missing: a working interpreter}"
    _rada_found="${_rada_probe_result#ok: }"
    if [ "$_rada_probe_result" != "$_rada_found" ] && [ -x "$(dirname "$_rada_found")/python" ]; then
        RADA_PYTHON="$(dirname "$_rada_found")/python"
        echo "[setup] using your Python environment: $RADA_PYTHON (it has torch, clip and the rest;" \
             "RADA_VENV=DIR or RADA_SKIP_SETUP=1 to choose otherwise)" >&2
    else
        _rada_reason="$_rada_candidate ($(command -v "$_rada_candidate" 2>/dev/null || echo 'not found')) lacks ${_rada_probe_result#missing: }"
        [ "$_rada_probe_result" != "$_rada_found" ] && _rada_reason="$_rada_found has no \`python\` beside it"
        echo "[setup] $_rada_reason. To run in your own environment instead, activate it with requirements.txt" \
             "installed (pip install -r requirements.txt), or set RADA_VENV=DIR or RADA_SKIP_SETUP=1." >&2
        _rada_use_venv "$REPO_ROOT/.venv" "the project environment"
    fi
fi

if [ "${RADA_WITH_DASSL:-0}" = 1 ] && ! _rada_has_dassl "$RADA_PYTHON"; then
    echo "[setup] installing Dassl into $RADA_PYTHON from ${DASSL_SOURCE:=git+https://github.com/KaiyangZhou/Dassl.pytorch@c61a1b570ac6333bd50fb5ae06aea59002fb20bb}" >&2
    # --no-deps: Dassl pins old linters and tb-nightly; --no-build-isolation: its setup.py imports numpy.
    "$RADA_PYTHON" -m pip install --quiet --no-deps --no-build-isolation "$DASSL_SOURCE" || {
        echo "[setup] could not install Dassl from $DASSL_SOURCE. Clone https://github.com/KaiyangZhou/Dassl.pytorch" >&2
        echo "        and run: $RADA_PYTHON -m pip install --no-deps --no-build-isolation -e Dassl.pytorch" >&2
        return 1 2>/dev/null || exit 1
    }
fi
export RADA_PYTHON
export PATH="$(dirname "$RADA_PYTHON"):$PATH"
