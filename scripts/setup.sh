#!/usr/bin/env bash
# One command sets up a fresh machine of this kind: system packages, a venv at .venv with the CPU build
# of torch, and the project editable with every extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  # sweethome3d-furniture: the textured kitchen models the data engine renders (CC0 / CC-BY libraries).
  # libosmesa6: software OpenGL, the fallback when EGL is missing. strace: the test that local Ray sends
  # nothing off loopback.
  need=""
  for p in sweethome3d-furniture libosmesa6 libegl1 libgl1-mesa-dri strace; do
    dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
  done
  if [ -n "$need" ]; then
    echo "[setup] apt-get install$need"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
  fi
else
  echo "[setup] not root or no apt-get: install sweethome3d-furniture and libosmesa6 yourself for the data engine" >&2
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned, so no other requirement can pull the CUDA build.
.venv/bin/python -m pip install -q -c constraints.txt torch
.venv/bin/python -m pip install -q -c constraints.txt -e ".[all]"
# Official MobileSAM TinyViT source for the compatibility tests (cached under .cache/, never committed).
bash scripts/fetch_reference_code.sh
echo "[setup] done: $(.venv/bin/python -c 'import torch, converseg_core; print("torch", torch.__version__)')"
