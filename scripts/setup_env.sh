#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv and installs ordercomp into it, building the
# compiled ops. TORCH_SPEC picks the torch to install first (default: the pinned CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test}

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned, so that nothing else pulls a different build; then the build tools.
python -m pip install -q "$TORCH_SPEC"
python -m pip install -q setuptools wheel ninja
# --no-build-isolation: the extension is compiled against the torch installed above.
python -m pip install -q --no-build-isolation -e ".[${EXTRAS}]"
python -c "import ordercomp, json; print('ordercomp backend:', json.dumps(ordercomp.backend_info()))"
