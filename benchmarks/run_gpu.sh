#!/usr/bin/env bash
# The one script that runs everything GPU-side: on the device tool's machine or any CUDA machine, from anywhere.
#
#   benchmarks/run_gpu.sh [PART ...]     (default: all)
#     build     compile csrc/ into build/kernels/libsidnet_kernels.so (+ ptxas resource report)
#     kernels   build, the kernel GPU tests, the kernel benchmark, sanitize
#     sanitize  csrc/tests/kernelsSmoke under compute-sanitizer (memcheck, racecheck, synccheck, initcheck)
#     tests     build, every GPU test under tests/ (pytest -m gpu)
#     bench     every benchmark (kernels, training throughput, Mask R-CNN)
#     bench-maskrcnn  Mask R-CNN img/s (python -m deploy.benchmark --parts maskrcnn; $MASKRCNN_CHECKPOINT: a trained
#                    .pt) + pyramid RoIAlign vs torchvision (benchmarks/maskrcnn.py)
#     all       build, tests, bench, sanitize
#     deploy    build, the runtime GPU tests (tests/test_runtime_gpu.py)
#     bench-deploy   python -m deploy.benchmark (eager baseline, torch and compiled backends, end to end, onnxruntime
#                    CPU; SIDNet and YOLOv2) and python -m deploy on the shared clip (two streams, zones)
#     bench-pipeline the multi-stream pipeline end to end (python -m deploy.benchmark --parts e2e): 1/4/16/32 streams of
#                    the 768x576 clip, the old thread decode, H.264 at 576p and 1080p on CPU processes and on NVDEC,
#                    paced cameras at 30 fps; the network-only img/s beside every row. NVDEC needs PyNvVideoCodec:
#                    .whl-pipeline/*.whl are installed when present (made on any machine for the GPU machine's Python:
#                    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                      --platform manylinux_2_28_x86_64 -d .whl-pipeline pynvvideocodec==2.2.4).
#                    The 1080p clip is made with PyAV (pip install av) unless SIDNET_CLIP_1080 names one.
#                    Paced sweeps (cameras at $SIDNET_CAMERA_FPS, 30): $SIDNET_CAMERAS stream counts (default
#                    "32 64 96 128"; "" for none) for each of $SIDNET_CAMERA_CASES (CLIP:DECODE, default
#                    "576p:process 1080p-h264:nvdec"), each sweep stopping at the first count that falls behind and
#                    naming the largest N kept up with. $SIDNET_E2E_MAX_WAIT_MS: the batch latency budget of every row,
#                    $SIDNET_E2E_DECODERS: decode processes / NVDEC threads. $SIDNET_VIDEO: the 576p clip (its H.264
#                    copy, <stem>_h264.mp4, next to it).
#     bench-compile  the torch backend vs torch.compile(max-autotune) in one run, SIDNet at batch 1 and 64 (minutes)
#     bench-stem     the csrc/stem kernel's build variants side by side (benchmarks/stem_variants.py)
#     recipe-persons the persons recipe's training stage (benchmarks/recipe_persons.sh --stage train): anchors, SIDNet-
#                    MobileNetV2 with and without mosaic (one GPU each when there are two) on loader.cache=device;
#                    $SIDNET_PERSONS_DATA: a data YAML (a packed copy from `python benchmarks/recipe_persons.py pack`),
#                    $SIDNET_PERSONS_WEIGHTS: the MobileNetV2 .pt, $SIDNET_PERSONS_EPOCHS (100),
#                    $SIDNET_PERSONS_TRAIN_LIMIT (480 s), $SIDNET_PERSONS_ARGS: more arguments of recipe_persons.sh,
#                    shell-quoted, e.g. '--no-ablation --variant ciou="loss.box_loss=ciou loss.rescore=true"'
#     bench-compiled-isolate  the AOTInductor load crash hunt (benchmarks/compiled_isolate.py, minutes)
#     maskrcnn-fix   Mask R-CNN train (in-training evaluations) + train.evaluate + deploy (torch backend, masks) through
#                    the entry points (benchmarks/maskrcnn_fix_smoke.sh $SIDNET_SEG_DATA $SIDNET_VIDEO)
#     bench-loader   loader-only and training img/s per loader option (benchmarks/loader_throughput.py) on
#                    $SIDNET_LOADER_DATA (a YOLO folder with images/{train,val}, labels/boxes/{train,val}; default
#                    ../shared/data/capston2; $SIDNET_LOADER_LABELS: the folder of its train/ and val/ label folders
#                    (default labels/boxes), $SIDNET_LOADER_OPTIONS: which
#                    options): SIDNet-MobileNetV2, 416², batch 64, AMP, 14 workers, and the no-loader GPU-bound row;
#                    SIDNET_LOADER_PROFILE=1 adds --profile (kernels and host/GPU time per phase of the step)
#     int8           INT8 on the tensor cores: tests/test_int8_gpu.py + benchmarks/int8_tensorcores.py on $SIDNET_INT8_ONNX
#                    (a 416² SIDNet INT8 export; `tests` needs it too, else those GPU tests skip, which fails the part)
#     bench-ddp      the same training on 1 GPU and on 2 through torchrun (benchmarks/ddp_throughput.py; NCCL, NVLink
#                    multicast off), on $SIDNET_LOADER_DATA; $SIDNET_DDP_BATCH (global, 64), $SIDNET_DDP_EPOCHS (8),
#                    $SIDNET_DDP_CACHE (device), $SIDNET_DDP_WEIGHTS (the MobileNetV2 .pt; default random init)
#     qat-smoke      QAT on CUDA through the entry points (benchmarks/qat_smoke.sh $SIDNET_QAT_DATA: a small YOLO-format
#                    folder; needs nvidia-modelopt: .whl-qat/*.whl are installed when present. Made on a machine
#                    with the int8 extra installed, for the GPU machine's Python 3.12:
#                    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl-qat \
#                      nvidia-modelopt==0.47.0 pulp==3.3.2 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
#                      typing-inspection==0.4.2 ninja nvidia-ml-py regex rich safetensors huggingface_hub ml_dtypes \
#                      onnxslim polygraphy lief click hf-xet filelock fsspec typing-extensions markdown-it-py mdurl \
#                      pygments httpx2 httpcore2 anyio h11 certifi idna sniffio truststore)
#
# Logs and result files go to $OUT (the device tool sets it) or ./outputs/gpu. On this machine a GPU test that
# skips is a failure (SIDNET_REQUIRE_GPU=1, and any "skipped" in a pytest summary fails the part).
# Exit status: non-zero if any part failed; later parts still run so that one call gathers everything.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SIDNET_REQUIRE_GPU=1 NO_ALBUMENTATIONS_UPDATE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then  # wheels the GPU machine lacks (../shared/tools/device-wheels.sh)
    if python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl; then
        export PYTHONPATH="$PWD:/tmp/site"
    else
        echo "run_gpu.sh: could not install .whl/*.whl (built for another Python?); using the installed packages" >&2
    fi
fi

if compgen -G ".whl-pipeline/*.whl" >/dev/null &&  # PyNvVideoCodec, for --decode nvdec
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site-pipeline .whl-pipeline/*.whl; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site-pipeline"
fi

if compgen -G ".whl-qat/*.whl" >/dev/null &&  # nvidia-modelopt and its dependencies, for qat-smoke
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site-qat .whl-qat/*.whl; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site-qat"
fi

failed=()
step() {  # step NAME LOG CMD...: run CMD, tee its output to $OUT/LOG, record a failure
    local name=$1 log=$2
    shift 2
    echo "=== $name: $*"
    if ! "$@" 2>&1 | tee "$OUT/$log"; then
        failed+=("$name")
        echo "=== $name FAILED"
        return 1
    fi
}

gpu_pytest() {  # gpu_pytest NAME LOG PATH...: pytest -m gpu, where a skip counts as a failure
    local name=$1 log=$2
    shift 2
    # SIDNET_GPU_TESTS_K: a pytest -k expression to run part of them (a short device budget)
    step "$name" "$log" python3 -m pytest -m gpu -q -rs -p no:cacheprovider ${SIDNET_GPU_TESTS_K:+-k "$SIDNET_GPU_TESTS_K"} "$@" || return 1
    if grep -Eq '[0-9]+ skipped' "$OUT/$log"; then
        failed+=("$name (GPU tests skipped)")
        echo "=== $name FAILED: GPU tests were skipped on a GPU machine"
        return 1
    fi
}

built=0
part_build() {
    [[ $built == 1 ]] && return 0
    built=1
    if [[ ${SIDNET_PREBUILT_KERNELS:-0} == 1 && -f build/kernels/libsidnet_kernels.so ]]; then
        echo "=== build: using the prebuilt build/kernels/libsidnet_kernels.so (SIDNET_PREBUILT_KERNELS=1)"
        return 0
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
    step build build.log python3 -m sidnet.kernels.build --resource-usage
}
part_sanitize() {
    local san nvcc tool limit exe=build/kernels/kernelsSmoke
    san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    mkdir -p build/kernels
    step sanitize-build sanitize.log "$nvcc" -O2 -std=c++17 -lineinfo -arch=native csrc/tests/kernelsSmoke.cpp \
        csrc/*/*.cu -o "$exe" || return 1
    for tool in memcheck:60 racecheck:90 synccheck:45 initcheck:45; do  # tool:seconds
        limit=${tool#*:} tool=${tool%:*}
        echo "=== sanitize-$tool" | tee -a "$OUT/sanitize.log"
        if ! timeout "$limit" "$san" --tool "$tool" --error-exitcode 9 "$exe" 2>&1 | tee -a "$OUT/sanitize.log"; then
            failed+=("sanitize-$tool")
        fi
    done
}
# INT8 on the tensor cores (issue 16): the GPU tests and INT8 vs FP16 img/s + per-layer table; $SIDNET_INT8_ONNX: a 416²
# SIDNet INT8 export (python -m export --precision int8, then sidnet.quant.int8_plan.fold_weight_quantize: 51 MB).
part_int8() {
    part_build
    SIDNET_INT8_ONNX=${SIDNET_INT8_ONNX:-} gpu_pytest int8-tests int8_tests.log tests/test_int8_gpu.py
    step bench-int8 int8_bench.log python3 benchmarks/int8_tensorcores.py --onnx "${SIDNET_INT8_ONNX:?}" --out "$OUT"
}
bench_kernels() { step bench-kernels bench_kernels.log python3 benchmarks/kernels.py --out "$OUT"; }
# Other benchmarks: add a function here and a call in part_bench.
bench_train() { step bench-train train_throughput.log python3 benchmarks/train_throughput.py --out "$OUT/train_throughput_h100.md"; }
# Mask R-CNN img/s (eager FP32, FP16 + channels_last, compiled trunk) and the pyramid RoIAlign kernel vs torchvision;
# MASKRCNN_CHECKPOINT: a trained best.pt (benchmarks/train_maskrcnn_coco128.sh), else untrained weights.
bench_maskrcnn() {
    step bench-roialign roialign.log python3 benchmarks/maskrcnn.py --out "$OUT"
    step bench-maskrcnn maskrcnn.log python3 -m deploy.benchmark --parts maskrcnn --out "$OUT" --stem gpu \
        --maskrcnn-images "${SIDNET_COCO128:-../shared/data/coco128}/images/val2017" \
        ${MASKRCNN_CHECKPOINT:+--maskrcnn-checkpoint "$MASKRCNN_CHECKPOINT"}
}
VIDEO=${SIDNET_VIDEO:-../shared/data/video/pedestrians_200.mp4}
bench_deploy() {
    step bench-deploy bench_deploy.log python3 -m deploy.benchmark --parts eager torch compiled e2e-host \
        --compiled-models sidnet --video "$VIDEO" --out "$OUT" --stem deploy_h100 --work-dir "${TMPDIR:-/tmp}/sidnet_bench"
    local ckpt=${SIDNET_DEPLOY_CHECKPOINT:-${TMPDIR:-/tmp}/sidnet_bench/sidnet.pt}
    [[ -f $ckpt ]] || { echo "no checkpoint $ckpt for the pipeline run"; failed+=(deploy-e2e); return 1; }
    step deploy-e2e deploy_e2e.log python3 -m deploy "$ckpt" "cam0=$VIDEO" "cam1=$VIDEO" --batch 16 --force \
        --zones benchmarks/zones_pedestrians.yaml --out "$OUT/deploy_e2e" --no-progress
    python3 -c "import cv2,sys; c=cv2.VideoCapture(sys.argv[1]); c.set(cv2.CAP_PROP_POS_FRAMES, 60); ok,f=c.read(); \
ok and cv2.imwrite(sys.argv[2], cv2.resize(f, (384, 288)), [cv2.IMWRITE_JPEG_QUALITY, 70])" \
        "$OUT/deploy_e2e/cam0.mp4" "$OUT/deploy_frame.jpg"
}
bench_pipeline() {
    step bench-pipeline bench_pipeline.log python3 -m deploy.benchmark --parts e2e --video "$VIDEO" \
        --e2e-cases ${SIDNET_E2E_CASES:-32:576p:process 32:1080p-h264:process 32:1080p-h264:nvdec 32:576p-h264:nvdec \
        32:576p:thread 32:576p-h264:process 1:576p:process 4:576p:process 16:576p:process} \
        --e2e-realtime ${SIDNET_CAMERAS-32 64 96 128} --e2e-realtime-case ${SIDNET_CAMERA_CASES:-576p:process 1080p-h264:nvdec} \
        --e2e-fps "${SIDNET_CAMERA_FPS:-30}" --out "$OUT" --stem pipeline_h200 \
        --work-dir "${TMPDIR:-/tmp}/sidnet_bench" ${SIDNET_CLIP_1080:+--clip-1080 "$SIDNET_CLIP_1080"} \
        ${SIDNET_E2E_MAX_WAIT_MS:+--e2e-max-wait-ms "$SIDNET_E2E_MAX_WAIT_MS"} ${SIDNET_E2E_DECODERS:+--e2e-decoders "$SIDNET_E2E_DECODERS"}
}
bench_compile() {
    # max-autotune takes minutes per batch size: the two sizes of the goal, 64 first (add compile-ours to --parts
    # for the BatchNorm-folded network compiled the same way with the csrc tail).
    step bench-compile bench_compile.log python3 -m deploy.benchmark --parts torch compile \
        --models sidnet --batches 64 1 --compile-batches 64 1 --out "$OUT" --stem deploy_vs_compile_h100 \
        --work-dir "${TMPDIR:-/tmp}/sidnet_bench"
}
bench_stem() { step bench-stem bench_stem.log python3 benchmarks/stem_variants.py --out "$OUT"; }
bench_compiled_isolate() { step bench-compiled-isolate compiled_isolate.log python3 benchmarks/compiled_isolate.py --out "$OUT"; }
LOADER_DATA=${SIDNET_LOADER_DATA:-../shared/data/capston2}
LOADER_LABELS=${SIDNET_LOADER_LABELS:-labels/boxes}  # the folder holding the label folders train/ and val/
bench_loader() {
    # shellcheck disable=SC2086  # the options are a word list
    step bench-loader loader_throughput.log python3 benchmarks/loader_throughput.py --root "$LOADER_DATA" \
        --labels "$LOADER_LABELS/train" --workers 14 --batch 64 \
        --epochs "${SIDNET_LOADER_EPOCHS:-3}" \
        --options ${SIDNET_LOADER_OPTIONS:-legacy none ram gpu_ram gpu_ram_cl device device_cl} \
        ${SIDNET_LOADER_PROFILE:+--profile} --out "$OUT/loader_throughput_h200.md"
}
bench_ddp() {
    local root
    root=$(realpath "$LOADER_DATA")
    export NCCL_NVLS_ENABLE=0  # NVLink multicast off (KINDS.md)
    step bench-ddp ddp_throughput.log python3 benchmarks/ddp_throughput.py --gpus 1 2 \
        --out "$OUT/ddp_h200x2.md" -- "model.kwargs.pretrained=${SIDNET_DDP_WEIGHTS:-null}" data=starter "data.root=$root" data.train.images=images/train \
        "data.train.labels=$LOADER_LABELS/train" data.val.images=images/val "data.val.labels=$LOADER_LABELS/val" \
        data.num_label_classes=1 data.negative_ratio=-1 "batch_size=${SIDNET_DDP_BATCH:-64}" workers=8 \
        "epochs=${SIDNET_DDP_EPOCHS:-8}" \
        eval.every=100 tensorboard=false "loader.cache=${SIDNET_DDP_CACHE:-device}" loader.gpu_aug=true \
        loader.channels_last=true
}
part_bench() { bench_kernels; bench_stem; bench_train; bench_deploy; bench_pipeline; bench_maskrcnn; }

for part in "${@:-all}"; do
    case $part in
        build) part_build ;;
        kernels)
            part_build && gpu_pytest tests-kernels tests_kernels.log tests/test_kernels.py
            bench_kernels
            part_sanitize
            ;;
        sanitize) part_sanitize ;;
        tests) part_build; gpu_pytest tests-gpu tests_gpu.log tests/ ;;
        bench) part_build; part_bench ;;
        bench-train) bench_train ;;
        bench-maskrcnn) bench_maskrcnn ;;  # needs the kernels library (part build)
        deploy) part_build; gpu_pytest tests-deploy tests_deploy.log tests/test_runtime_gpu.py ;;
        bench-deploy) part_build; bench_deploy ;;
        bench-compile) part_build; bench_compile ;;
        bench-pipeline) part_build; bench_pipeline ;;
        bench-stem) bench_stem ;;
        maskrcnn-fix) step maskrcnn-fix maskrcnn_fix.log benchmarks/maskrcnn_fix_smoke.sh \
            "${SIDNET_SEG_DATA:-../shared/data/coco128}" "${SIDNET_VIDEO:-../shared/data/video/pedestrians_200.mp4}" ;;
        qat-smoke) step qat-smoke qat_smoke.log benchmarks/qat_smoke.sh "${SIDNET_QAT_DATA:-.data/mini}" cuda ;;
        recipe-persons)  # the persons recipe's training stage; score it where nvidia-modelopt and OpenCV < 5 are
            persons_args=()
            [[ -z ${SIDNET_PERSONS_ARGS:-} ]] || eval "persons_args=(${SIDNET_PERSONS_ARGS})"
            step recipe-persons recipe_train.log benchmarks/recipe_persons.sh --stage train --few-files --out "$OUT" \
                --data "${SIDNET_PERSONS_DATA:-conf/data/persons.yaml}" ${SIDNET_PERSONS_WEIGHTS:+--weights "$SIDNET_PERSONS_WEIGHTS"} \
                --epochs "${SIDNET_PERSONS_EPOCHS:-100}" --train-limit "${SIDNET_PERSONS_TRAIN_LIMIT:-480}" \
                "${persons_args[@]}" ;;
        bench-compiled-isolate) part_build; bench_compiled_isolate ;;
        bench-loader) bench_loader ;;
        bench-ddp) bench_ddp ;;
        int8) part_int8 ;;
        all) part_build; gpu_pytest tests-gpu tests_gpu.log tests/; part_bench; part_sanitize ;;
        *) echo "run_gpu.sh: unknown part '$part' (build, kernels, sanitize, tests, bench, all)" >&2; exit 2 ;;
    esac
done

if ((${#failed[@]})); then
    echo "=== FAILED: ${failed[*]}"
    exit 1
fi
echo "=== all parts passed"
