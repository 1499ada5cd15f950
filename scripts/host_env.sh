# Sourced by scripts/test.sh and scripts/demo.sh (needs ROOT set): the per-run environment a host needs.
#
# indomain_host_env VENV HOST
#   Newer ComfyUI imports torchaudio at start-up. When the venv has no torchaudio (no build for the
#   pinned torch in the package index) and HOST is not the bundled 0.3.75 tree (which never imports
#   it), put the test-only stand-in tests/stubs/torchaudio on PYTHONPATH for this run.
indomain_host_env() {
    local venv="$1" host="$2"
    if [ "$host" != "$ROOT/.host/ComfyUI" ] && ! "$venv/bin/python" -c "import torchaudio" >/dev/null 2>&1; then
        export PYTHONPATH="$ROOT/tests/stubs${PYTHONPATH:+:$PYTHONPATH}"
        echo "[host] torchaudio is not installed: using the test stand-in tests/stubs/torchaudio (raises if called)"
    fi
}

# indomain_host_version HOST -> e.g. "0.33.0"
indomain_host_version() {
    sed -n 's/^__version__ *= *"\(.*\)".*/\1/p' "$1/comfyui_version.py" 2>/dev/null | head -1
}
