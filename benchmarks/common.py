"""Helpers shared by the benchmark scripts: the machine description and RESULTS.md sections."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def machine() -> str:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none available to this task"
    return (f"CPU {cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}); GPU: {gpu}; "
            f"python {platform.python_version()}, torch {torch.__version__}")


def replace_section(path: Path, name: str, body_lines: list[str]) -> str:
    """Rewrite the `<!-- name:start/end -->` block of `path` (appended if absent); returns the block."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = "\n".join([start, *body_lines, end])
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return block
