"""The export report: ``report.json`` (everything) and ``report.md`` (the same, for people), in the output folder."""

from __future__ import annotations

import json
from pathlib import Path


def _ops(counts: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in counts.items())


def write_report(out_dir: Path, report: dict) -> Path:
    """Write ``report.json`` and ``report.md``; returns the markdown path."""
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    env, model, onnx_info = report["environment"], report["model"], report["onnx"]
    lines = [
        f"# SIDNet export: {model['name']} {model['input_size']}x{model['input_size']}, {report['precision']}, "
        f"target {report['target']}, backend {report['backend']}",
        "",
        f"- command: `{env['command']}`",
        f"- produced: {env['date']} on {env['device']}; torch {env['torch']}, onnx {report['versions']['onnx']}, "
        f"onnxruntime {report['versions']['onnxruntime']}, onnx-graphsurgeon {report['versions']['onnx_graphsurgeon']}",
        f"- weights: {model['source']}",
        f"- anchors (input pixels): {model['anchors']}; classes: {model['class_names']}",
        f"- decode: conf_thresh {report['conf_thresh']}, topk {report['topk']}",
        "",
        "## Files",
        "",
        *[f"- `{name}` sha256 `{digest}`" for name, digest in report["files"].items()],
        "",
        "## Graph",
        "",
        f"- exported by torch: {onnx_info['exported_nodes']} nodes ({_ops(onnx_info['exported_ops'])})",
        f"- after surgery: {onnx_info['final_nodes']} nodes ({_ops(onnx_info['final_ops'])})",
        f"- opset {onnx_info['opset']}; onnx.checker: {onnx_info['checker']}",
        "",
        "### Surgery log",
        "",
        "```",
        *report["surgery"],
        "```",
        "",
        "## Parity",
        "",
        report["parity"]["summary"],
    ]
    engine = report.get("engine")
    if engine:
        layers = engine["layers"]
        lines += [
            "",
            "## Engine",
            "",
            f"- `{engine['info']['engine']}`: {engine['info']['backend']} {engine['info']['backend_version']}, "
            f"{engine['info']['built_on']}, build {engine['info']['build_seconds']} s",
            f"- layers: {layers['onnx_nodes']} ONNX nodes -> {layers['network_layers']} network layers -> "
            f"{layers['engine_layers'] if layers['engine_layers'] is not None else 'n/a'} engine layers "
            f"({layers['engine_layers_note']})",
            f"- timing cache: {engine['info']['timing_cache']}",
        ]
        if engine["info"].get("plugins"):
            lines.append(f"- plugins: {engine['info']['plugins']}")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
