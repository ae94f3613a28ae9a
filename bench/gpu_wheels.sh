#!/usr/bin/env bash
# Downloads into .whl/ the wheels bench/gpu_check.sh needs on a bare CUDA image that has torch,
# torchvision, numpy, scipy, opencv, matplotlib and pyyaml but not detectron2 and its small
# dependencies (Python 3.12, x86-64). Run on a machine that reaches PyPI; .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$@"; }
# detectron2's code, packaged as a cp310 wheel; its compiled _C is not used by comformer
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl sal-detectron2==0.7.2
dl fvcore iopath yacs termcolor omegaconf hydra-core antlr4-python3-runtime panopticapi-lite \
    pycocotools black
echo "wheels in .whl/:"; ls .whl
