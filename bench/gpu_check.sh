#!/usr/bin/env bash
# The GPU check from a copy of the working tree, postsim not installed: needs python3 with torch and
# numpy (transformers for the encoders; onnx, onnxruntime-gpu and faiss where they are to be measured).
#   bash bench/gpu_check.sh --out DIR [--dry-run] [--budget-s SECONDS]
# .ci/typecheck/postsim links the source folders as the postsim package, as the editable install maps them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/.ci/typecheck${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m postsim.bench.gpu_check "$@"
