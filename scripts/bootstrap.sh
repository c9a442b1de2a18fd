#!/usr/bin/env bash
# Create or update the project's virtual environment.
#   scripts/bootstrap.sh demo   what `sealtorch demo` needs
#   scripts/bootstrap.sh dev    everything: tests, lint, type checks, benchmarks
# Re-running is cheap: it only reinstalls when pyproject.toml, the constraints or
# TORCH_INDEX_URL change.
#
# TORCH_INDEX_URL=URL takes PyTorch and torchvision from that package index instead, e.g.
# PyTorch's CPU-only wheel index on a host without a GPU (about 1.5 GB instead of 6 GB).
set -euo pipefail
cd "$(dirname "$0")/.."

profile="${1:-dev}"
case "$profile" in
  demo) extras="all" ;;
  dev) extras="dev" ;;
  *) echo "usage: $0 demo|dev" >&2; exit 2 ;;
esac

venv="${VENV:-.venv}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "sealtorch needs Python 3.11 or newer; found: $("$python" --version 2>&1)" >&2
  echo "Set PYTHON=/path/to/python3.11 and run again." >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating virtual environment in $venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
fi

stamp="$venv/.sealtorch-$profile"
torch_index=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then torch_index=(--index-url "$TORCH_INDEX_URL"); fi
fingerprint=$( (cat pyproject.toml scripts/constraints.txt; echo "${TORCH_INDEX_URL:-}") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ]; then
  exit 0
fi

# Stale stamps (other profile) must not survive a dependency change.
rm -f "$venv"/.sealtorch-*
echo "==> installing PyTorch (first run: a few minutes)"
"$venv/bin/python" -m pip install --quiet --progress-bar off -c scripts/constraints.txt \
  "${torch_index[@]}" torch torchvision \
  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
echo "==> installing sealtorch[$extras]"
"$venv/bin/python" -m pip install --quiet --progress-bar off -c scripts/constraints.txt -e ".[$extras]" \
  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
echo "$fingerprint" > "$stamp"
if [ "$profile" = dev ]; then echo "$fingerprint" > "$venv/.sealtorch-demo"; fi
echo "==> ready: $venv"
