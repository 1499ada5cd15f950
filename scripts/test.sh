#!/usr/bin/env bash
# Set everything up from a fresh clone and run the test suite (this is what CI runs).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_host.sh"
VENV="${INDOMAIN_VENV:-$ROOT/.venv}"
cd "$ROOT"

# Real-browser test (tests/test_browser.py): the frontend the host pins, Playwright (driver only: never
# `playwright install`, no browser download) and Debian's chromium. Idempotent: skipped when present.
FRONTEND_PIN="$(grep -E '^comfyui-frontend-package==' "$(cat "$ROOT/.host/comfyui_dir")/requirements.txt" | head -1)"
if ! "$VENV/bin/python" -c "import playwright.sync_api, comfyui_frontend_package" >/dev/null 2>&1; then
    echo "[test] installing ${FRONTEND_PIN:-comfyui-frontend-package} and playwright"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "${FRONTEND_PIN:-comfyui-frontend-package==1.32.9}" playwright
fi
if ! command -v chromium >/dev/null 2>&1; then
    echo "[test] installing Debian's chromium"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium
fi
export INDOMAIN_REQUIRE_BROWSER=1

set +e
"$VENV/bin/python" -m pytest tests -q -rs --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit "$rc"
