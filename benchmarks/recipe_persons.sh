#!/usr/bin/env bash
# The persons recipe: SIDNet-MobileNetV2 on coco128 + capston2 + cctv (conf/data/persons.yaml), anchors re-tuned first,
# the default augmentation with mosaic 0.5 on the GPU-resident loader (loader.cache=device: images, mosaics and
# augmentation on the GPU); FP32 and INT8 (PTQ + accuracy gate) ONNX; one table of AP50 / AP / AP_small / recall@0.3
# per val set for the checkpoint, both ONNX files and the reference detector (same evaluator, same images), plus the
# small-person before/after: the same training without mosaic (the "ablation" row), trained alongside (on a second GPU
# when there is one, else sharing the first).
#
#   benchmarks/recipe_persons.sh [--smoke] [--stage train|score|all] [--data YAML] [--eval-data YAML] [--out DIR]
#       [--epochs N] [--weights MOBILENETV2.pt] [--ref-python PYTHON] [--train-limit SECONDS] [--few-files]
#       [--aug "OVERRIDES"] [--no-ablation] [--variant NAME="OVERRIDES" ...] [--size N]
#
#   --stage train  anchors + the two trainings (GPU machine; ~8 min with the defaults); slim checkpoints in OUT
#   --stage score  FP32 + INT8 export, every evaluation, the reference, the table (needs nvidia-modelopt for INT8 and
#                  an OpenCV < 5 Python for the reference: --ref-python, e.g. a venv with opencv-python-headless<5)
#   --stage all    both, on one machine (default)
#   --aug          the main run's overrides (default "aug=default", mosaic 0.5); --no-ablation: no "ablation" variant
#   --variant      another training beside the main one, on the same data, anchors and schedule: NAME="OVERRIDES"
#                  (repeatable; the default is one, ablation="aug=default aug.mosaic=0"; a --variant list replaces
#                  it). Each gets OUT/NAME.pt and, in the score stage, a table row reports/NAME.json. The runs share
#                  the GPUs round-robin (the main run on GPU 0) and split the loader workers. A variant's own
#                  data=OTHER.yaml replaces --data for that run (e.g. a copy that oversamples a source with repeat)
#   --size         the training input side of every run (model.input_size; default 416) and the side the anchors
#                  are tuned at
#   --few-files    train stage: logs, configs and anchors into OUT/train_logs.tgz (the GPU machine returns 8 files)
#   --smoke        CPU check of the whole script: a tiny packed copy of the data, 1 epoch, 64 px steps, few images
#
# --data: the training YAML (default conf/data/persons.yaml; on the GPU machine a packed copy made by
# `python benchmarks/recipe_persons.py pack`, which fits its 64 MiB). --eval-data: what the table is scored on (default
# conf/data/persons.yaml: the original images, the ones the reference detector's published figures use).
# Writes OUT/{anchors_persons.yaml, train_*.log, persons.pt(.0,.1), <variant>.pt(.0,.1), reports/*.json,
# table.md}.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=all SMOKE=0 DATA=conf/data/persons.yaml EVAL_DATA="" OUT=${OUT:-outputs/recipe_persons} EPOCHS=18 WEIGHTS=""
REF_PYTHON=${REF_PYTHON:-python3} SIZE=416 TRAIN_LIMIT=400 WORKERS=${WORKERS:-$(nproc)} FEW_FILES=0 ABLATION=1
MAIN_AUG=(aug=default) VARIANTS=()
while (($#)); do
  case $1 in
    --smoke) SMOKE=1 ;;
    --stage) STAGE=$2; shift ;;
    --data) DATA=$2; shift ;;
    --eval-data) EVAL_DATA=$2; shift ;;
    --out) OUT=$2; shift ;;
    --epochs) EPOCHS=$2; shift ;;
    --size) SIZE=$2; shift ;;
    --weights) WEIGHTS=$2; shift ;;
    --ref-python) REF_PYTHON=$2; shift ;;
    --train-limit) TRAIN_LIMIT=$2; shift ;;
    --few-files) FEW_FILES=1 ;;
    --aug) read -r -a MAIN_AUG <<<"$2"; shift ;;
    --no-ablation) ABLATION=0 ;;
    --variant) [[ $2 == *=* ]] || { echo "error: --variant $2: use NAME=\"OVERRIDES\"" >&2; exit 1; }
               VARIANTS+=("$2"); shift ;;
    *) echo "error: unknown argument $1 (see the header of $0)" >&2; exit 1 ;;
  esac
  shift
done
EVAL_DATA=${EVAL_DATA:-$DATA}
mkdir -p "$OUT/reports"
RUNS=${RUNS:-${TMPDIR:-/tmp}/recipe_persons_runs}
SPLIT=val
((${#VARIANTS[@]})) || ! ((ABLATION)) || VARIANTS=("ablation=aug=default aug.mosaic=0")
for v in "${VARIANTS[@]}"; do
  [[ ${v%%=*} =~ ^[A-Za-z0-9_]+$ && ${v%%=*} != persons ]] \
    || { echo "error: --variant name '${v%%=*}': use letters, digits and _ (not 'persons')" >&2; exit 1; }
done
NRUNS=$((1 + ${#VARIANTS[@]}))
# Loader workers split between the runs (the GPU-resident loader needs few: workers send indices and parameters).
W_RUN=$(( WORKERS / NRUNS > 0 ? WORKERS / NRUNS : 1 ))
TRAIN=("model.input_size=$SIZE" batch_size=64 optim.warmup_epochs=2 eval.every=1000 "epochs=$EPOCHS" loader.cache=device
       loader.gpu_aug=true
       loader.channels_last=true)
# The runs take the GPUs round-robin (they are GPU-bound with loader.cache=device); with one GPU they share it.
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
GPU_MAIN=0
if ((SMOKE)); then
  python3 benchmarks/recipe_persons.py pack --data "$DATA" --out "$RUNS/smoke_data" --limit 12 --quality 80
  DATA=$RUNS/smoke_data/persons.yaml EVAL_DATA=$RUNS/smoke_data/persons.yaml
  TRAIN=(batch_size=8 "epochs=1" max_steps_per_epoch=2 device=cpu model.input_size=160 aug.multiscale=[128,192]
         eval.every=1000 loader.cache=device loader.gpu_aug=true)
  W_RUN=0
fi
[[ -n $WEIGHTS ]] && TRAIN+=("model.kwargs.pretrained=$WEIGHTS")
log() { echo "=== $(date -u +%H:%M:%S) $*"; }

stage_train() {
  log "anchors on $DATA"
  python3 -m train.anchors --data "$DATA" --size "$SIZE" -k 3 --evolve 1000 --out "$OUT/anchors_persons.yaml" \
    | tee "$OUT/anchors.log"
  local names=(persons) v
  for v in "${VARIANTS[@]}"; do names+=("${v%%=*}"); done
  for v in "${names[@]}"; do rm -rf "${RUNS:?}/$v"; done
  local common=(model=sidnet_mobilenetv2 "model.anchors=$(realpath -m "$OUT/anchors_persons.yaml")" "${TRAIN[@]}")
  log "training persons (${MAIN_AUG[*]}, GPU $GPU_MAIN) and ${#VARIANTS[@]} variant(s): ${VARIANTS[*]}"
  local start=$SECONDS rc=0 i=1 pids=()
  CUDA_VISIBLE_DEVICES=$GPU_MAIN timeout "$TRAIN_LIMIT" python3 -m train "${common[@]}" "data=$DATA" "${MAIN_AUG[@]}" \
    "workers=$W_RUN" name=persons "hydra.run.dir=$RUNS/persons" >"$OUT/train_persons.log" 2>&1 &
  local main=$!
  for v in "${VARIANTS[@]}"; do
    local over=() name=${v%%=*}
    read -r -a over <<<"${v#*=}"
    [[ " ${over[*]}" == *" data="* ]] || over=("data=$DATA" "${over[@]}")  # the variant's own data=, else --data
    CUDA_VISIBLE_DEVICES=$((NGPU > 1 ? i % NGPU : 0)) timeout "$TRAIN_LIMIT" python3 -m train "${common[@]}" \
      "${over[@]}" "workers=$W_RUN" "name=$name" "hydra.run.dir=$RUNS/$name" >"$OUT/train_$name.log" 2>&1 &
    pids+=("$!:$name")
    i=$((i + 1))
  done
  wait $main || rc=$?
  log "persons: exit $rc after $((SECONDS - start)) s (124: stopped by --train-limit)"
  for v in "${pids[@]}"; do
    wait "${v%%:*}" && log "${v#*:}: done after $((SECONDS - start)) s" \
      || log "${v#*:}: exit $? after $((SECONDS - start)) s"
  done
  tail -n 3 "$OUT"/train_*.log
  # The last epoch's EMA weights (val is the test set: no best.pt selection), float16 parts of <= 15 MiB, and the
  # logs in one archive: the GPU machine returns 8 files of <= 16 MiB.
  for run in "${names[@]}"; do
    [[ -f $RUNS/$run/last.pt ]] && python3 benchmarks/recipe_persons.py slim "$RUNS/$run/last.pt" "$OUT/$run.pt"
    [[ -f $RUNS/$run/config.yaml ]] && cp "$RUNS/$run/config.yaml" "$OUT/config_$run.yaml"
  done
  if ((FEW_FILES)); then
    (cd "$OUT" && tar czf train_logs.tgz anchors* train_*.log config_*.yaml && rm -f anchors.log train_*.log config_*.yaml)
  fi
  [[ -f $OUT/persons.pt.0 ]] || { echo "error: no checkpoint from the training run, see $OUT/train_persons.log" >&2
                                  return 1; }
}

stage_score() {
  local ck=$OUT/persons.pt
  local part run
  for part in "$OUT"/*.pt.0; do
    [[ -f $part ]] && python3 benchmarks/recipe_persons.py join "${part%.0}" "${part%.0}"
  done
  log "export FP32 and INT8 (PTQ, entropy, gate on val:0/2) of $ck"
  # 8 calibration batches of 8 training images (64 batches took too long on a 2-core CPU); the accuracy gate on
  # val:0/2 decides whether that was enough (benchmarks/results/persons_gpu: no layer fell back).
  python3 -m export --checkpoint "$ck" --out "$OUT/export_fp32" 2>&1 | tail -n 5
  python3 -m export --checkpoint "$ck" --precision int8 --calib-data "$DATA" --calib-batches $((SMOKE ? 2 : 8)) \
    --gate-split val:0/2 --out "$OUT/export_int8" int8.budget=0.5 2>&1 | tail -n 8
  log "evaluate on $EVAL_DATA split $SPLIT"
  local ev=(--data "$EVAL_DATA" --split "$SPLIT")
  python3 -m train.evaluate --checkpoint "$ck" "${ev[@]}" --out "$OUT/reports/checkpoint.json" | tail -n 4
  python3 -m train.evaluate --onnx "$OUT/export_fp32/model.onnx" "${ev[@]}" --out "$OUT/reports/onnx_fp32.json" \
    | tail -n 4
  python3 -m train.evaluate --onnx "$OUT/export_int8/model.onnx" "${ev[@]}" --out "$OUT/reports/onnx_int8.json" \
    | tail -n 4
  for v in "${VARIANTS[@]}"; do  # one row per variant
    run=${v%%=*}
    [[ ! -f $OUT/$run.pt ]] || python3 -m train.evaluate --checkpoint "$OUT/$run.pt" "${ev[@]}" \
      --out "$OUT/reports/${v%%=*}.json" | tail -n 4
  done
  log "reference detector ($REF_PYTHON)"
  "$REF_PYTHON" benchmarks/recipe_persons.py reference --data "$EVAL_DATA" --split "$SPLIT" \
    --out "$OUT/reports/reference.json" || echo "reference not scored (needs OpenCV < 5: --ref-python)"
  python3 benchmarks/recipe_persons.py table --reports "$OUT/reports" --out "$OUT/table.md"
}

case $STAGE in
  train) stage_train || exit 1 ;;
  score) stage_score || exit 1 ;;
  all) { stage_train && stage_score; } || exit 1 ;;
  *) echo "error: --stage $STAGE: use train, score or all" >&2; exit 1 ;;
esac
log "done: $OUT"
