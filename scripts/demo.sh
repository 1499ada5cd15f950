#!/usr/bin/env bash
# The README's first command: set up the host (idempotent), then run the end-to-end demo.
# Extra arguments go to the demo (e.g. --fast, --out DIR, --base CKPT --domain-unet FILE).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_host.sh"
VENV="${INDOMAIN_VENV:-$ROOT/.venv}"
cd "$ROOT"
# shellcheck source=scripts/host_env.sh
source "$ROOT/scripts/host_env.sh"
indomain_host_env "$VENV" "$(cat "$VENV/indomain-comfyui-dir")"
exec "$VENV/bin/python" -m indomain.demo "$@"
