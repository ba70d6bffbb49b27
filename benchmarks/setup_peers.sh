#!/usr/bin/env bash
# Create the peer environments the benchmark suite drives (idempotent; rerun at will).
#
#   .venv-bench-optimum  torch 2.13 (CPU) + optimum-onnx 0.1.0 (optimum ~2.1, transformers <4.58)
#   .venv-bench-genai    torch 2.13 (CPU) + transformers 5.x + onnxruntime-genai 0.18 (+ onnx)
#
# Both pin onnxruntime to the version of the main environment so every engine runs the same
# kernels. torch==2.13.0 is installed FIRST: any other torch spec pulls the CUDA builds.
# An environment whose stamp file matches its requirement list is left alone; pass --force
# to reinstall. run_all.py skips a peer whose environment does not exist.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON=${PYTHON:-python3}
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1
ORT_VERSION=$("$PYTHON" -c "import onnxruntime; print(onnxruntime.__version__)" 2>/dev/null || echo 1.32.0)
TORCH="torch==2.13.0"

make_env() {  # make_env DIR REQUIREMENT...
  local dir=$1; shift
  local stamp="$dir/.bench-requirements"
  local want
  want=$(printf '%s\n' "$TORCH" "$@")
  if [ "$FORCE" = 0 ] && [ -x "$dir/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "== $dir: up to date"
    return
  fi
  echo "== $dir: installing $TORCH, then $*"
  [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install -q "$TORCH"
  "$dir/bin/pip" install -q "$@"
  "$dir/bin/python" -c "import torch, transformers, onnxruntime; print('   torch', torch.__version__, '| transformers', transformers.__version__, '| onnxruntime', onnxruntime.__version__)"
  printf '%s\n' "$want" > "$stamp"
}

make_env .venv-bench-optimum "optimum-onnx==0.1.0" "transformers<4.58" "onnxruntime==$ORT_VERSION" "numpy" "safetensors"
make_env .venv-bench-genai "onnxruntime-genai==0.18.0" "transformers>=5,<6" "onnx" "onnx-ir" "onnxruntime==$ORT_VERSION" "numpy" "safetensors"
echo "== peers ready"
