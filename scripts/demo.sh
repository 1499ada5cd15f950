#!/usr/bin/env bash
# The README's first command: set up the host (idempotent), then run the end-to-end demo.
# Extra arguments go to the demo (e.g. --fast, --out DIR, --base CKPT --domain-unet FILE).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_host.sh"
VENV="${INDOMAIN_VENV:-$ROOT/.venv}"
cd "$ROOT"
exec "$VENV/bin/python" -m indomain.demo "$@"
