#!/usr/bin/env bash
# SIDNet (Darknet-19, ReLU, reorg, 3 tuned anchors) vs the original YOLOv2 (LeakyReLU, 5 VOC anchors) on the persons
# data, trained side by side from random initialisation (no ImageNet Darknet weights ship offline) with the same
# recipe, then scored by the same evaluator on the same val images, and timed by the same inference benchmark:
# the SIDNet report's accuracy/speed table for this data. GPU machine; both runs share the GPUs round-robin.
#
#   benchmarks/sidnet_vs_yolov2.sh --data YAML [--out DIR] [--epochs N] [--train-limit SECONDS]
#                                  [--anchors YAML] [--eval-data YAML]
#
# --data: the training YAML (on the GPU machine a packed copy, `python benchmarks/recipe_persons.py pack`);
# --anchors: SIDNet's 3 anchors (default: the persons recipe's, benchmarks/results/persons_ciou/anchors_persons.yaml);
# --eval-data: what the table is scored on (default --data). Writes OUT/{train_*.log, config_*.yaml,
# reports/{sidnet,yolov2}.json, table.md, speed.md}.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="" EVAL_DATA="" OUT=${OUT:-outputs/sidnet_vs_yolov2} EPOCHS=50 TRAIN_LIMIT=430
ANCHORS=benchmarks/results/persons_ciou/anchors_persons.yaml
while (($#)); do
  case $1 in
    --data) DATA=$2; shift ;;
    --eval-data) EVAL_DATA=$2; shift ;;
    --out) OUT=$2; shift ;;
    --epochs) EPOCHS=$2; shift ;;
    --train-limit) TRAIN_LIMIT=$2; shift ;;
    --anchors) ANCHORS=$2; shift ;;
    *) echo "error: unknown argument $1 (see the header of $0)" >&2; exit 1 ;;
  esac
  shift
done
[[ -n $DATA ]] || { echo "error: --data YAML is required (a packed persons copy on the GPU machine)" >&2; exit 1; }
EVAL_DATA=${EVAL_DATA:-$DATA}
RUNS=${RUNS:-${TMPDIR:-/tmp}/sidnet_vs_yolov2_runs}
mkdir -p "$OUT/reports"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
WORKERS=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))
TRAIN=("data=$DATA" batch_size=64 optim.warmup_epochs=2 eval.every=1000 "epochs=$EPOCHS" loader.cache=device
       loader.gpu_aug=true loader.channels_last=true "workers=$WORKERS")
log() { echo "=== $(date -u +%H:%M:%S) $*"; }

log "training sidnet and yolov2, $EPOCHS epochs each (limit $TRAIN_LIMIT s)"
start=$SECONDS
CUDA_VISIBLE_DEVICES=0 timeout "$TRAIN_LIMIT" python3 -m train model=sidnet "model.anchors=$(realpath "$ANCHORS")" \
  "${TRAIN[@]}" name=sidnet "hydra.run.dir=$RUNS/sidnet" >"$OUT/train_sidnet.log" 2>&1 &
sid=$!
CUDA_VISIBLE_DEVICES=$((NGPU > 1 ? 1 : 0)) timeout "$TRAIN_LIMIT" python3 -m train model=yolov2 "${TRAIN[@]}" \
  name=yolov2 "hydra.run.dir=$RUNS/yolov2" >"$OUT/train_yolov2.log" 2>&1 &
yolo=$!
wait $sid && log "sidnet: done after $((SECONDS - start)) s" || log "sidnet: exit $? after $((SECONDS - start)) s"
wait $yolo && log "yolov2: done after $((SECONDS - start)) s" || log "yolov2: exit $? after $((SECONDS - start)) s"
for run in sidnet yolov2; do
  [[ -f $RUNS/$run/config.yaml ]] && cp "$RUNS/$run/config.yaml" "$OUT/config_$run.yaml"
  # The last checkpoint written (a run stopped by --train-limit keeps its last finished epoch: the log says which).
  [[ -f $RUNS/$run/last.pt ]] && python3 -m train.evaluate --checkpoint "$RUNS/$run/last.pt" --data "$EVAL_DATA" \
    --split val --out "$OUT/reports/$run.json" --images 0 -q | tail -n 2
done
python3 benchmarks/recipe_persons.py table --reports "$OUT/reports" --out "$OUT/table.md"
rm -f "$OUT"/reports/*_pr.png
log "inference speed (eager FP16 + CUDA graph, random weights: speed does not depend on them)"
python3 -m deploy.benchmark --parts eager --models sidnet yolov2 sidnet_mobilenetv2 --batches 1 64 -q \
  --out "$OUT" --stem speed | tail -n 12
log "done: $OUT"
