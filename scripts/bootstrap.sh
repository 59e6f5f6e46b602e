#!/usr/bin/env bash
# Create or re-use the virtual environment $ENTREG_VENV (default .venv) with entreg installed
# in editable mode with its test, rl, dmc and t2i extras. torch and torchvision are installed first, pinned to
# the releases on local disk (a newer torch would download several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ENTREG_VENV:-.venv}"
python="${PYTHON:-python3}"
key="$(cat pyproject.toml | sha256sum | cut -c1-16) $(pwd)"
stamp="$venv/.entreg-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
"$venv/bin/python" -m pip install --quiet -e ".[test,rl,dmc,t2i]"
echo "$key" > "$stamp"
echo "entreg environment ready in $venv"
