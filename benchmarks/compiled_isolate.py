"""Which property of the model makes the AOTInductor package crash at load on the GPU? One child process per config.

    python benchmarks/compiled_isolate.py --out benchmarks/results/deploy      # on the GPU machine

The compiled backend's package of full SIDNet at 416² (dynamic batch 1..128) compiled, then segfaulted inside
``torch._C._aoti.AOTIModelPackageLoader`` on the H100 (torch 2.11; ``compiled_416_segfault_h100.log``), while the GPU
test's package (a narrow SIDNet at 128², batch ≤ 8) loads and runs. Run 1 (2026-11-23 08:32): narrow at 416² ≤ 128, full
at 128² ≤ 8 and full at 416² ≤ 8 all compiled and all crashed at load, with export and load in one process. Run 2:
export and load in separate processes, the way a user runs them: both (full 416² ≤ 128, narrow 128² ≤ 8) compiled,
both crashed at load. Run 3: one narrow package, loaded in fresh processes after different imports: it loads and runs
only after ``import onnxruntime`` (``benchmarks/results/deploy/compiled_isolate/run3.md``), so the compiled backend now
imports onnxruntime first. Re-running this script after that change measures the backend as shipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidnet.runtime.benchmark import compiled_in_child  # noqa: E402

NARROW = {"input_size": 128, "width": 0.25, "max_batch": 8, "reuse_package": True}
CONFIGS = {  # name → (work folder, compiled_rows options); export and load+time run in two processes (as a user does)
    # Run 3: the GPU test loads the same kind of package in a pytest process that imported more first. Which import?
    "narrow 128² ≤ 8, nothing preloaded": ("narrow", {**NARROW, "preload": ("sidnet.runtime.backends.torch",)}),
    "narrow, after import cv2": ("narrow", {**NARROW, "preload": ("cv2",)}),
    "narrow, after import onnxruntime": ("narrow", {**NARROW, "preload": ("onnxruntime",)}),
    "narrow, after loading the csrc kernels library": ("narrow", {**NARROW, "preload": ("sidnet.kernels",)}),
    "narrow, after a cuBLAS matmul + cuDNN conv": ("narrow", {**NARROW, "preload": ("warm-cuda",)}),
    "narrow, after PIL + cv2 + onnxruntime + kernels + warm CUDA": (
        "narrow", {**NARROW, "preload": ("PIL.Image", "cv2", "onnxruntime", "sidnet.kernels", "warm-cuda")}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/compiled_isolate"))
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/compiled_isolate"))
    p.add_argument("--timeout", type=float, default=170)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| config | outcome | compile s | img/s (batch) |", "|---|---|---|---|"]
    results = {}
    for i, (name, (folder, opts)) in enumerate(CONFIGS.items()):
        work = args.work_dir / folder
        work.mkdir(parents=True, exist_ok=True)
        batches = [1, opts["max_batch"]]
        r = compiled_in_child("sidnet", batches=batches, work_dir=work, log=args.out / f"compiled_isolate_{i}.log",
                              timeout=args.timeout, **opts)  # fmt: skip
        results[name] = r
        rates = ", ".join(f"{row['r']['img_s']:,.0f} ({row['r']['batch']})" for row in r["rows"])
        secs = next(iter(r.get("compile_seconds", {}).values()), "")
        lines.append(f"| {name} | {r['note']} | {secs} | {rates} |")
        print(lines[-1], flush=True)
    text = f"# AOTInductor load crash: isolation ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
    text += "\n".join(lines) + "\n"
    (args.out / "compiled_isolate_h100.md").write_text(text)
    (args.out / "compiled_isolate_h100.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
