#!/usr/bin/env bash
# QAT end to end through the real entry points on a tiny model and a small data folder, on DEVICE (default cuda):
# FP32 training → QAT fine-tune (modelopt fake INT8) → evaluate the QAT checkpoint → INT8 export without recalibrating
# → evaluate the Q/DQ ONNX in onnxruntime. For the GPU machine (benchmarks/run_gpu.sh qat-smoke); CI covers the same
# path on the CPU in tests/test_qat.py.
#   benchmarks/qat_smoke.sh DATA_DIR [DEVICE]     DATA_DIR: train/{images,labels} and val/{images,labels}, YOLO format
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=$(cd "$1" && pwd)
DEVICE=${2:-cuda}
OUT=${OUT:-$PWD/outputs/qat_smoke}
RUNS=$(mktemp -d)
mkdir -p "$OUT"
TINY=(model=sidnet "model.anchors=[[12,24],[30,60],[70,110]]" model.input_size=128 model.kwargs.width=0.125 batch_size=4
      workers=0 "device=$DEVICE" tensorboard=false aug=none data=starter "data.root=$DATA" data.negative_ratio=-1)
for s in train val; do TINY+=("data.$s.format=yolo" "data.$s.images=$s/images" "data.$s.labels=$s/labels"); done
python3 -m train "${TINY[@]}" epochs=3 max_steps_per_epoch=4 optim.lr=1e-3 name=fp32 "hydra.run.dir=$RUNS/fp32" 2>&1 | tail -3
python3 -m train "${TINY[@]}" quant=qat "quant.init_from=$RUNS/fp32/last.pt" quant.calib_method=minmax \
    quant.calib_batch_size=4 epochs=2 optim.lr=1e-4 name=qat "hydra.run.dir=$RUNS/qat" 2>&1 | tail -3
python3 -m train.evaluate --checkpoint "$RUNS/qat/last.pt" --device "$DEVICE" --out "$OUT/eval_qat_checkpoint.json" 2>&1 | tail -2
python3 -m export --checkpoint "$RUNS/qat/last.pt" --precision int8 --out "$RUNS/export" 2>&1 | tail -3
onnx=$RUNS/export/model.onnx  # the Q/DQ graph (model_fp32.onnx: its FP32 source)
printf '{"root": "%s", "class_names": ["person"], "class_map": {"0": 0}, "num_label_classes": 80, "negative_ratio": -1,
 "train": {"format": "yolo", "images": "train/images", "labels": "train/labels"},
 "val": {"format": "yolo", "images": "val/images", "labels": "val/labels"}}\n' "$DATA" > "$RUNS/data.yaml"
python3 -m train.evaluate --onnx "$onnx" --data "$RUNS/data.yaml" --out "$OUT/eval_qat_onnx.json" 2>&1 | tail -2
cp "$RUNS/export/"*manifest*.json "$OUT/" 2>/dev/null || true
echo "qat_smoke: OK ($DEVICE)"
