#!/usr/bin/env bash
# Wheels a bare GPU machine (Python 3.12, CUDA torch, nvcc, transformers, onnx; no diffusers, no
# build tools, no internet) needs for `python bench/gpu_check.py`: fetched here into .whl/ (ignored
# by git, about 35 MB), carried there, installed with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
#   CLEANDIFT_CUDA=ON python3 -m pip install -q --no-deps --no-build-isolation . && python3 bench/gpu_check.py --out $OUT/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  diffusers==0.42.1 scikit-build-core==1.1.2 pybind11==3.1.0 pathspec==1.1.1 packaging==26.4 cmake==4.4.4 ninja==1.13.2
du -sh .whl
