#!/usr/bin/env bash
# The GPU check of issue 11 (about 8 minutes on one H100/H200): writes bench/results/gpu.json.
#   bench/gpu_check.sh CIFAR_DIR [--device cpu] [--budget 6m] [--wheels DIR] [other bench/gpu_check.py options]
# CIFAR_DIR holds cifar10-test.tar.gz and (for --parts quality) cifar10-train.tar.gz. The machine's own torch
# and torchvision are kept: the project is installed with --no-deps, and only packages it lacks are added (from
# --wheels DIR when the machine is offline, else from the package index), with torch/torchvision pinned to what
# is installed.
# Rehearse on a CPU: bench/gpu_check.sh CIFAR_DIR --device cpu --budget 40s --batch 64 --steps 3 --label-images 500
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
[ $# -ge 1 ] || { sed -n '2,8p' "$0"; exit 2; }
cifar="$1"; shift
wheels=""
args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--wheels" ]; then wheels="$2"; shift 2; else args+=("$1"); shift; fi
done

# Installed already (a development machine): leave that install alone.
env -u PYTHONPATH python -c "import twist_core" 2>/dev/null \
  || python -m pip install --quiet --no-deps --no-build-isolation -e . \
  || echo "note: editable install failed; running from the source tree (PYTHONPATH)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

# What the check needs beyond torch/torchvision; each missing one is installed if possible, else reported.
missing=$(python - <<'PY'
import importlib.util
need = {"numpy": "numpy", "PIL": "pillow", "scipy": "scipy", "sklearn": "scikit-learn", "tqdm": "tqdm",
        "yaml": "pyyaml", "matplotlib": "matplotlib", "onnx": "onnx", "onnxscript": "onnxscript",
        "onnxruntime": "onnxruntime-gpu", "faiss": "faiss-cpu"}
print(" ".join(pkg for module, pkg in need.items() if importlib.util.find_spec(module) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing what is missing: $missing"
  pins="$(mktemp)"
  python -c "import torch, torchvision; print(f'torch=={torch.__version__}\ntorchvision=={torchvision.__version__}')" > "$pins"
  if [ -n "$wheels" ]; then
    python -m pip install --quiet --no-index --find-links "$wheels" -c "$pins" $missing || true
  else
    timeout 120 python -m pip install --quiet --timeout 15 -c "$pins" $missing || true
  fi
  python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, '(kept)')"
fi

exec python -m bench.gpu_check "$cifar" "${args[@]}"
