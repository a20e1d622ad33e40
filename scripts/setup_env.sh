#!/usr/bin/env bash
# Create (once) the virtual environment .venv and install requirements.txt into it.
# Sourced by the other scripts; re-installs only when requirements.txt changes.
# RADA_WITH_DASSL=1 also installs Dassl (not on PyPI) from its GitHub repository when the
# environment lacks it; its run-time dependencies are in requirements.txt.
set -euo pipefail
# RADA_SKIP_SETUP=1 leaves PATH and .venv alone (the script tests put a stub `python` first on PATH).
if [ "${RADA_SKIP_SETUP:-0}" = 1 ]; then
    return 0 2>/dev/null || exit 0
fi
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RADA_VENV:-$REPO_ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$REPO_ROOT/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[setup] installing requirements.txt into $VENV (first run: a few minutes)"
    "$VENV/bin/python" -m pip install --quiet -r "$REPO_ROOT/requirements.txt"
    echo "$WANT" > "$STAMP"
fi
if [ "${RADA_WITH_DASSL:-0}" = 1 ] && ! "$VENV/bin/python" -c "import dassl" 2>/dev/null; then
    echo "[setup] installing Dassl from ${DASSL_SOURCE:=git+https://github.com/KaiyangZhou/Dassl.pytorch@c61a1b570ac6333bd50fb5ae06aea59002fb20bb}"
    # --no-deps: Dassl pins old linters and tb-nightly; --no-build-isolation: its setup.py imports numpy.
    "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation "$DASSL_SOURCE" || {
        echo "[setup] could not install Dassl from $DASSL_SOURCE. Clone https://github.com/KaiyangZhou/Dassl.pytorch" >&2
        echo "        and run: $VENV/bin/python -m pip install --no-deps --no-build-isolation -e Dassl.pytorch" >&2
        return 1 2>/dev/null || exit 1
    }
fi
export PATH="$VENV/bin:$PATH"
