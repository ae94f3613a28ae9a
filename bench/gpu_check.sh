#!/usr/bin/env bash
# GPU check, under 8 minutes on one CUDA GPU: the compiled deformable attention against the PyTorch
# reference (tests/test_ms_deform_attn_cuda.py), then FT and CoMFormer training steps of the ADE20K
# R50 panoptic configuration (640x640 crops, batch 8, AMP, random images and masks, 100-10 step 1)
# with each deformable-attention implementation: s/iteration and peak CUDA memory per method.
#
#   bash bench/gpu_check.sh                 # in an environment that has comformer's packages
#   PY=/path/to/python bash bench/gpu_check.sh
#
# On a machine without comformer's packages (e.g. a bare CUDA image with torch): put their wheels
# in .whl/ first (bench/gpu_wheels.sh downloads them on a machine with PyPI); they are installed
# into /tmp/site without touching the image's own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! "$PY" -c "import detectron2" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    # the detectron2 wheel ships a stray top-level tools/ package
    rm -rf /tmp/site/tools
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "bench/gpu_check.sh needs a CUDA GPU"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PY
echo "== compiled deformable attention vs the PyTorch reference (CUDA)"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_ms_deform_attn_cuda.py
for impl in pytorch compiled; do
    echo "== training steps, DEFORMABLE_ATTN_IMPL=$impl"
    timeout 150 "$PY" bench/train_step.py --device cuda --methods ft comformer --data random \
        --iters 10 --warmup 3 --opts MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTN_IMPL "$impl" \
        --output "$OUT/gpu_train_step_$impl.json"
done
