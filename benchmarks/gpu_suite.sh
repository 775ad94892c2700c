#!/usr/bin/env bash
# The GPU suite (benchmarks/gpu_suite.py) from a bare Python that has torch and torchvision: the
# project's other packages come from wheels carried in .whl/ (`make gpu-wheels`), installed into a
# folder of their own when the Python lacks them; the code runs from this tree, not installed.
#
#   bash benchmarks/gpu_suite.sh                        # a machine with one GPU, under 8 minutes
#   bash benchmarks/gpu_suite.sh --quick --device cpu   # the same code, small, on a CPU
#
# PYTHON picks the interpreter (default python3). docs/benchmarks.md says how to run it on a lent GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${TMPDIR:-/tmp}/cvat-detector-gpu-site

if ! "$PYTHON" -c "import nuclio_sdk, faster_coco_eval" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_suite.sh: error: $PYTHON lacks nuclio-sdk or faster-coco-eval and .whl/ has no wheels (make gpu-wheels)" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
