#!/usr/bin/env bash
# Set everything up from a fresh clone and run the test suite (this is what CI runs).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_host.sh"
VENV="${INDOMAIN_VENV:-$ROOT/.venv}"
cd "$ROOT"
set +e
"$VENV/bin/python" -m pytest tests -q -rs --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit "$rc"
