#!/usr/bin/env bash
# Issue 18 on the two-GPU machine in one device call:
#   GPU 1: Mask R-CNN on persons_seg (COCO128's masks, repeat 8, + capston2/cctv person boxes as box-only images);
#   GPU 0: the same model on coco128_seg (COCO128's masks only), then `python -m deploy.benchmark --parts maskrcnn`
#          with that checkpoint (torchvision eager vs the torch backend's CUDA-graph deploy module, 512²) and the
#          Mask R-CNN GPU tests.
# Both trainings score the same val (COCO128 val2017: YOLO-seg polygons for bbox + segm AP, YOLO boxes for box AP).
#
# usage (repo root): benchmarks/maskrcnn_persons.sh DATA_ROOT WEIGHTS OUT [COCO_EPOCHS] [PERSONS_EPOCHS] [LIMIT_S]
#   DATA_ROOT holds coco128/ (images, annotations, labels/segments, labels/boxes), capston2/ and cctv/ as in
#   ../shared/data; WEIGHTS: the MobileNetV2 features .pt; LIMIT_S: the persons_seg training's time limit.
set -uo pipefail
DATA=$1; W=$2; OUT=$3; CE=${4:-50}; PE=${5:-8}; LIMIT=${6:-360}
mkdir -p "$OUT/coco128_seg" "$OUT/persons_seg"
(CUDA_VISIBLE_DEVICES=1 SIDNET_MASKRCNN_DATA=persons_seg SIDNET_MASKRCNN_RUN=/tmp/runs/mrcnn_persons \
  SIDNET_MASKRCNN_LIMIT=$LIMIT benchmarks/train_maskrcnn_coco128.sh "$DATA" "$W" "$OUT/persons_seg" "$PE" \
  eval.every=2 > "$OUT/persons_seg/run.log" 2>&1; echo "persons_seg rc=$?" >> "$OUT/persons_seg/run.log") &
CUDA_VISIBLE_DEVICES=0 SIDNET_MASKRCNN_RUN=/tmp/runs/mrcnn_coco benchmarks/train_maskrcnn_coco128.sh \
  "$DATA/coco128" "$W" "$OUT/coco128_seg" "$CE" > "$OUT/coco128_seg/run.log" 2>&1
echo "coco128_seg rc=$?" >> "$OUT/coco128_seg/run.log"
CUDA_VISIBLE_DEVICES=0 python -m deploy.benchmark --parts maskrcnn --maskrcnn-checkpoint /tmp/runs/mrcnn_coco/best.pt \
  --maskrcnn-images "$DATA/coco128/images/val2017" --out "$OUT" --stem deploy_h200 --work-dir /tmp/mb 2>&1 |
  tee "$OUT/bench_maskrcnn.log"
CUDA_VISIBLE_DEVICES=0 SIDNET_SHARED_DATA=$DATA python -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_runtime_gpu.py tests/test_export_maskrcnn.py -k "maskrcnn or graph_nms" 2>&1 | tee "$OUT/gpu_tests_maskrcnn.log"
wait
