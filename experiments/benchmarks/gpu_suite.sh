#!/usr/bin/env bash
# The CUDA suite on a GPU machine, from a clean checkout: bash experiments/benchmarks/gpu_suite.sh [--out F]
#   --dry-run                 list the steps and check their flags (no GPU needed)
#   --fetch-wheels DIR [PY]   on a machine with a package index: download the wheels the GPU image lacks
#                             (pycocotools) for Python PY (default 3.12) into DIR, to carry to the GPU machine
# The GPU machine has torch, torchvision, timm, opencv, rich, PyYAML and safetensors but no package index:
# what is missing is installed from RPL_WHEELS (default .gpu_wheels, git-ignored) with --no-index.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--fetch-wheels" ]; then
  dir=${2:?usage: gpu_suite.sh --fetch-wheels DIR [PYTHON_VERSION]}
  "$PY" -m pip download --quiet --only-binary=:all: --no-deps --python-version "${3:-3.12}" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" pycocotools
  ls "$dir"
  exit 0
fi
missing=$("$PY" -c 'import importlib.util as u; print(" ".join(m for m in ("pycocotools",) if u.find_spec(m) is None))')
if [ -n "$missing" ] && [ "${1:-}" != "--dry-run" ]; then
  wheels=${RPL_WHEELS:-.gpu_wheels}
  if [ ! -d "$wheels" ]; then
    echo "gpu_suite: $missing is not installed and there is no wheel folder $wheels; prepare one with" \
         "'bash experiments/benchmarks/gpu_suite.sh --fetch-wheels $wheels' where a package index is reachable" >&2
    exit 2
  fi
  "$PY" -m pip install --quiet --no-index --find-links "$wheels" $missing
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" experiments/benchmarks/gpu_suite.py "$@"
