"""What a report needs to say about where it was produced: device, versions, date, command."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch


def environment(device: torch.device | str | None = None) -> dict[str, str]:
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        dev = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": dev,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv]),
    }


def publish_report(lines: list[str], *, out: Path | None, payload: dict[str, Any]) -> None:
    """Print a benchmark's markdown table and, with ``out``, write it there plus ``payload`` beside it as JSON
    (``out`` with the suffix ``.json``: the environment and the rows, for comparisons across runs)."""
    text = "\n".join(lines)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
