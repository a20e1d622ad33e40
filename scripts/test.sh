#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
RADA_NEEDS="${RADA_NEEDS:-} pytest" source scripts/setup_env.sh
python -m pytest "$@"
